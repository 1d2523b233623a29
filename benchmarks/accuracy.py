"""Accuracy per format x calibration algorithm on SmolLM2-135M.

Calibration: --calib-samples windows of --seq-len tokens spread over the five Austen novels other
than Pride and Prejudice; evaluation: perplexity on the first --eval-windows windows of Pride and
Prejudice. The model runs in --dtype (bf16 by default, the checkpoint's own). Each run happens in
its own process, so its peak RSS is its own.

    python benchmarks/accuracy.py [--runs fp8:max,int8_sq:smoothquant,int4_awq:awq_lite] [--markdown]
    python benchmarks/accuracy.py --defaults [--readme README.md]

A run named by its qformat alone (`int4_awq`) uses `PTQConfig(qformat=...)` as a user writes it:
the format's default algorithm and `sequential`. `--defaults` runs every format that way and prints
the table of defaults beside ModelOpt's default for the format; `--readme` also writes that table
into the README between its defaults-table markers.
"""

import argparse
import multiprocessing
import resource
import time
from pathlib import Path

import torch
from defaults_table import defaults_rows, update_readme
from tables import print_table  # benchmarks/tables.py: the script's own directory is on sys.path

from hf_ptq_plugin import formats as F

DEFAULT_RUNS = ("fp8:max,int8_sq:smoothquant,int8_sq:max,int8_wo:max,int4_awq:awq_lite,int4_awq:gptq,"
                "int4_awq:max,w4a8_awq:awq_lite,nvfp4:max,nvfp4_awq:awq_lite")


def add_protocol_arguments(parser) -> None:
    """The accuracy protocol's options, shared by the benchmarks that calibrate and evaluate with it."""
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "hf_ptq_plugin")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--eval-windows", type=int, default=64)
    parser.add_argument("--calib-samples", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=4)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default=None,
                        help="comma-separated qformat:algorithm pairs; qformat:algorithm:nonseq calibrates with "
                             "PTQConfig(sequential=False) (blocks fed full-precision outputs, one pass per block), "
                             ":seq with sequential=True, neither with the format's default; a further :keep "
                             "calibrates with pre_quant_scales='keep' (ModelOpt's layout) instead of 'fold'")
    parser.add_argument("--group-size", type=int, default=None, help="INT4 group size (default: automatic)")
    add_protocol_arguments(parser)
    parser.add_argument("--baseline-ppl", type=float, default=None,
                        help="unquantized perplexity measured earlier with the same protocol (skips that run)")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                        help="the model's dtype for calibration and evaluation: bfloat16 (the checkpoint's and the "
                             "protocol's; fast on CPUs with AVX512-BF16 or AMX) or float32 (faster on AVX2-only CPUs)")
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--defaults", action="store_true",
                        help="run every qformat (or those --runs names) with its default configuration and print "
                             "the table of defaults")
    parser.add_argument("--readme", type=Path, help="with --defaults: rewrite that README's table of defaults")
    args = parser.parse_args()
    if args.readme and not args.defaults:
        parser.error("--readme needs --defaults")
    return args


def windows(args):
    from austen import calibration_and_eval_texts
    from smollm2 import smollm2_checkpoint
    from transformers import AutoTokenizer

    from hf_ptq_plugin.calibration.text import first_windows, spread_windows, tokenize

    path = smollm2_checkpoint(args.cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(path)
    calib, evaluation = calibration_and_eval_texts(args.cache_dir)
    return (path, spread_windows(tokenize(tokenizer, calib), args.seq_len, args.calib_samples),
            first_windows(tokenize(tokenizer, evaluation), args.seq_len, args.eval_windows))


def calibration_pass(model, windows, batch_size):
    for batch in windows.split(batch_size):
        model(input_ids=batch)  # outputs dropped: kept, 16 batches of logits would add ~3 GB to the peak RSS


RUN_OPTIONS = {"nonseq": {"sequential": False}, "seq": {"sequential": True}, "keep": {"pre_quant_scales": "keep"}}


def one_run(run, group_size, dtype, path, calib_windows, eval_windows, batch_size):
    """Runs in a child process: load, quantize, evaluate; returns the measurements."""
    from transformers import AutoModelForCausalLM

    from hf_ptq_plugin import PTQConfig, quantize
    from hf_ptq_plugin.evaluation import perplexity

    qformat, algorithm, *mode = run.split(":") if ":" in run else (run, None)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
    start = time.perf_counter()
    config = None
    if qformat != "none":
        options = {key: value for m in mode for key, value in RUN_OPTIONS[m].items()}  # none: the defaults
        config = PTQConfig(qformat=qformat, algorithm=algorithm, group_size=group_size, **options)
        quantize(model, config, forward_loop=lambda m: calibration_pass(m, calib_windows, batch_size))
    calib_seconds = time.perf_counter() - start
    ppl = perplexity(model, eval_windows, batch_size, progress=f"{qformat}:{algorithm}")
    group = getattr(getattr(model, "ptq_config", None), "group_size", None)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"run": run, "group": group, "ppl": ppl, "calib_s": calib_seconds, "peak_mb": peak_mb,
            "algorithm": config and config.resolved_algorithm, "sequential": config and config.resolved_sequential}


def main():
    args = parse_args()
    path, calib_windows, eval_windows = windows(args)
    runs = args.runs.split(",") if args.runs else list(F.FORMATS) if args.defaults else DEFAULT_RUNS.split(",")
    if args.baseline_ppl is None:
        runs.insert(0, "none:-")
    context = multiprocessing.get_context("spawn")
    results = []
    for run in runs:
        with context.Pool(1) as pool:
            try:
                results.append(pool.apply(one_run, (run, args.group_size, args.dtype, path, calib_windows,
                                                    eval_windows, args.batch_size)))
            except ValueError as error:  # e.g. a format whose blocks do not divide this model's layers
                results.append({"run": run, "error": str(error)})
        print(f"done: {results[-1]}", flush=True)  # a long series shows each result as it lands
    baseline = args.baseline_ppl if args.baseline_ppl is not None else results[0]["ppl"]
    header = ["format:algorithm", "group", "perplexity", "ratio to unquantized", "calibration s", "peak RSS MB"]
    rows = [[r["run"], "-", r["error"], "-", "-", "-"] if "error" in r else
            [r["run"], str(r["group"] or "-"), f"{r['ppl']:.2f}", f"{r['ppl'] / baseline:.3f}",
             f"{r['calib_s']:.0f}", f"{r['peak_mb']:.0f}"] for r in results]
    print(f"protocol: {args.calib_samples} calibration samples x {args.seq_len} tokens (Austen minus P&P), "
          f"perplexity on the first {args.eval_windows} windows x {args.seq_len} of Pride and Prejudice, "
          f"{args.dtype} compute, {torch.get_num_threads()} threads, unquantized perplexity {baseline:.2f}"
          + (" (given with --baseline-ppl)" if args.baseline_ppl is not None else ""))
    print_table(header, rows, args.markdown)
    if args.defaults:
        table = defaults_rows(results, baseline)
        print_table(*table, markdown=True)
        if args.readme:
            update_readme(args.readme, *table)


if __name__ == "__main__":
    main()
