"""AutoQuantize on SmolLM2-135M: perplexity per effective-bits budget against the uniform formats.

The accuracy protocol of benchmarks/accuracy.py: --calib-samples windows of --seq-len tokens spread
over the five Austen novels other than Pride and Prejudice calibrate every candidate; the first
--score-samples of them score the candidates (gradient method: one forward/backward per batch);
perplexity on the first --eval-windows windows of Pride and Prejudice; bf16. INT4 candidates use
group size --group-size. Each run is its own process, so its wall time and peak RSS are its own.
A search run reports the formats chosen (groups per format), the achieved effective bits, and the
bytes the search held (the model plus every candidate format's layers) against the bf16 model's.

    python benchmarks/autoquantize.py [--runs int4_awq+fp8@4.5,nvfp4+fp8@4.8,fp8] [--markdown]
"""

import argparse
import multiprocessing
import resource
import time
from collections import Counter

import torch
from accuracy import add_protocol_arguments, calibration_pass, windows  # benchmarks/accuracy.py: the same protocol
from tables import print_table

DEFAULT_RUNS = ("int4_awq,fp8,nvfp4,int4_awq+fp8@4.5,int4_awq+fp8@5.0,int4_awq+fp8@6.0,"
                "nvfp4+fp8@4.8,nvfp4+fp8@6.0")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default=DEFAULT_RUNS,
                        help="comma-separated runs: a qformat (uniform, quantize()), or qformat+qformat@bits "
                             "(auto_quantize over those candidates at that effective-bits budget)")
    parser.add_argument("--group-size", type=int, default=64, help="INT4 group size")
    parser.add_argument("--algorithms", default="",
                        help="comma-separated qformat:algorithm overrides for uniform runs and candidates alike "
                             "(default: each format's own)")
    parser.add_argument("--method", choices=("gradient", "kl_div"), default="gradient")
    parser.add_argument("--score-samples", type=int, default=16, help="calibration windows that score the candidates")
    parser.add_argument("--score-labels", choices=("sampled", "data"), default="sampled",
                        help="the gradient score's next tokens: drawn from the model (default) or the data's "
                             "(ModelOpt's)")
    add_protocol_arguments(parser)
    parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    args.dtype = "bfloat16"  # the protocol's; accuracy.windows reads args.* only for the data
    return args


def one_run(run, args, path, calib_windows, eval_windows):
    """Runs in a child process: load, quantize (uniformly or by search), evaluate; returns the measurements."""
    from transformers import AutoModelForCausalLM

    from hf_ptq_plugin import PTQConfig, auto_quantize, quantize
    from hf_ptq_plugin import formats as F
    from hf_ptq_plugin.autoquant import causal_lm_loss
    from hf_ptq_plugin.evaluation import perplexity

    algorithms = dict(pair.split(":") for pair in args.algorithms.split(",") if pair)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    loop = lambda m: calibration_pass(m, calib_windows, args.batch_size)  # noqa: E731
    start = time.perf_counter()
    if "@" in run:
        qformats, bits = run.split("@")
        score_batches = list(calib_windows[:args.score_samples].split(args.batch_size))
        candidates = qformats.split("+")
        int4 = any(F.get_format(q).group_size_choices for q in candidates)
        loss_fn = causal_lm_loss if args.score_labels == "data" and args.method == "gradient" else None
        _, result = auto_quantize(model, candidates, float(bits), loop, method=args.method, loss_fn=loss_fn,
                                  algorithms={q: a for q, a in algorithms.items() if q in candidates} or None,
                                  group_size=args.group_size if int4 else None, score_loop=score_batches)
        chosen = Counter(result.choice.values())
        formats = " ".join(f"{q}:{n}" for q, n in sorted(chosen.items()))
        achieved = f"{result.effective_bits:.3f} ({result.true_bits:.3f})"
        held = result.memory["peak_bytes"] / result.memory["bf16_model_bytes"]  # model + every candidate
    else:
        group_size = args.group_size if F.get_format(run).group_size_choices else None
        quantize(model, PTQConfig(qformat=run, group_size=group_size, algorithm=algorithms.get(run)), forward_loop=loop)
        formats, achieved, held = "uniform", "-", None
    seconds = time.perf_counter() - start
    ppl = perplexity(model, eval_windows, args.batch_size, progress=run)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"run": run, "formats": formats, "bits": achieved, "ppl": ppl, "seconds": seconds, "peak_mb": peak_mb,
            "held": held}


def main():
    args = parse_args()
    path, calib_windows, eval_windows = windows(args)
    context = multiprocessing.get_context("spawn")
    results = []
    for run in args.runs.split(","):
        with context.Pool(1) as pool:
            results.append(pool.apply(one_run, (run, args, path, calib_windows, eval_windows)))
        print(f"done: {results[-1]}", flush=True)  # a long series shows each result as it lands
    header = ["run", "groups per format", "effective (stored) bits", "perplexity", "seconds", "peak RSS MB",
              "search held / bf16 model"]
    rows = [[r["run"], r["formats"], r["bits"], f"{r['ppl']:.3f}", f"{r['seconds']:.0f}", f"{r['peak_mb']:.0f}",
             "-" if r["held"] is None else f"{r['held']:.2f}x"] for r in results]
    print(f"protocol: {args.calib_samples} calibration samples x {args.seq_len} tokens (Austen minus P&P), the first "
          f"{args.score_samples} scoring ({args.method}, {args.score_labels} labels), perplexity on the first "
          f"{args.eval_windows} windows x "
          f"{args.seq_len} of Pride and Prejudice, bf16, INT4 group size {args.group_size}, algorithms "
          f"{args.algorithms or 'each format default'}, "
          f"{torch.get_num_threads()} threads")
    print_table(header, rows, args.markdown, width=24)


if __name__ == "__main__":
    main()
