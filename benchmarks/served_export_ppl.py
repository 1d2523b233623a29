"""Perplexity of SmolLM2-135M's vLLM export loaded *without* the plugin, beside its unified checkpoint's.

For each run (a qformat, or qformat:algorithm): quantize with the accuracy protocol
(`accuracy.py`: Austen minus Pride and Prejudice for calibration, Pride and Prejudice for
evaluation), save the unified checkpoint (`save_pretrained`) and the vLLM one
(`export_checkpoint(..., target="vllm")`: compressed-tensors), then measure each checkpoint's
perplexity in a fresh process: the unified one loaded by transformers through the plugin, the
vLLM one by transformers + compressed-tensors, with the plugin never imported.

    python benchmarks/served_export_ppl.py [--runs int4_awq,int4_awq:awq_lite,nvfp4_awq,int8_sq] [--markdown]
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from accuracy import add_protocol_arguments, calibration_pass, windows  # benchmarks/ is on sys.path
from tables import print_table

CHILD = Path(__file__).with_name("checkpoint_perplexity.py")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default="int4_awq,int4_awq:awq_lite,nvfp4_awq,int8_sq",
                        help="comma-separated qformat or qformat:algorithm (the format's default algorithm if absent)")
    add_protocol_arguments(parser)
    parser.add_argument("--markdown", action="store_true")
    return parser.parse_args()


def checkpoint_perplexity(checkpoint: Path, eval_path: Path, plugin: bool, batch_size: int) -> dict:
    """Perplexity of a checkpoint measured in a fresh interpreter (`checkpoint_perplexity.py`)."""
    command = [sys.executable, str(CHILD), str(checkpoint), str(eval_path), str(batch_size)]
    result = subprocess.run(command + (["--plugin"] if plugin else []), capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{checkpoint.name}: {result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def one_run(run: str, path: Path, calib_windows, eval_path: Path, workdir: Path, batch_size: int) -> dict:
    from transformers import AutoModelForCausalLM

    from hf_ptq_plugin import PTQConfig, export_checkpoint, quantize

    qformat, _, algorithm = run.partition(":")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    config = PTQConfig(qformat=qformat, algorithm=algorithm or None)
    quantize(model, config, forward_loop=lambda m: calibration_pass(m, calib_windows, batch_size))
    unified, served = workdir / f"{qformat}-unified", workdir / f"{qformat}-vllm"
    model.save_pretrained(unified)
    export_checkpoint(model, served, target="vllm")
    del model
    ours = checkpoint_perplexity(unified, eval_path, plugin=True, batch_size=batch_size)
    theirs = checkpoint_perplexity(served, eval_path, plugin=False, batch_size=batch_size)
    if theirs["plugin_imported"] or not ours["plugin_imported"]:
        raise RuntimeError(f"{run}: the plugin was imported where it must not be, or not where it must")
    return {"run": run, "algorithm": config.resolved_algorithm, "unified": ours, "vllm": theirs}


def main():
    args = parse_args()
    path, calib_windows, eval_windows = windows(args)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        eval_path = Path(tmp) / "eval_windows.pt"
        torch.save(eval_windows, eval_path)
        for run in args.runs.split(","):
            workdir = Path(tmp) / run.replace(":", "-")
            result = one_run(run, path, calib_windows, eval_path, workdir, args.batch_size)
            print(f"done: {result}", flush=True)
            ours, theirs = result["unified"]["ppl"], result["vllm"]["ppl"]
            rows.append([run, result["algorithm"], f"{ours:.3f}", f"{theirs:.3f}", f"{100 * (theirs / ours - 1):+.2f}%",
                         theirs_quantizer(result)])
    print(f"protocol: {args.calib_samples} calibration samples x {args.seq_len} tokens (Austen minus P&P), "
          f"perplexity on the first {args.eval_windows} windows x {args.seq_len} of Pride and Prejudice")
    header = ["run", "algorithm", "unified checkpoint (plugin)", "vLLM export (no plugin)", "difference",
              "transformers quantizer"]
    print_table(header, rows, args.markdown)


def theirs_quantizer(result: dict) -> str:
    return f"{result['vllm']['quantizer']}, {result['vllm']['dtype']}"


if __name__ == "__main__":
    main()
