"""Peak memory and wall time of quantize-while-loading vs a plain bf16 `from_pretrained`.

A synthetic Llama (`--shape`: "1b", about 1.1 B parameters in TinyLlama's shape, or "270m", hidden
1024, intermediate 4096, 16 layers; random weights) is saved once as bf16 safetensors. Each case
then loads it in its own process while a thread samples the process's resident anonymous memory
(`RssAnon` in /proc/self/status) every millisecond or so: pages of the memory-mapped checkpoint are
file-backed, the kernel can drop them, and they do not count. Reported:
the peak above the level just before loading, divided by the bytes of the quantized modules'
tensors (weights and scales), whose physical floor is 1.0x plus one layer in transit.

Wall time is given against two baselines: the plain load ("bf16"), a lazy memory map that reads
no weight until a forward pass touches it, and the plain load followed by one read of every
weight ("bf16+read"), the least any load that quantizes must do.

glibc keeps freed heap memory resident, and how much depends on the order of allocations, so
the 4-bit loads (more, smaller temporaries per weight) read higher than what is alive at any time.
`--glibc-mmap-threshold 131072` runs the children with MALLOC_MMAP_THRESHOLD_ set, which makes
glibc give large freed blocks back at once: the difference is memory the allocator holds, not
tensors.

Section "speed" (`--sections speed`) times the quantize step alone, in this process: every Linear
weight of one layer of the shape, as bf16 in memory, through the load path's quantizer (the native
kernels where they apply) and through torch's ops (`quantize_weight_in_row_blocks`), with 1 and 2
threads; weights/s in total and per thread. As in a load, the heap is trimmed before each weight
(untimed), so each weight's outputs land on fresh pages and their page faults are timed.

    python benchmarks/load_memory.py [--formats int4_awq,nvfp4,fp8,int8_wo] [--shape 1b|270m]
                                     [--sections load,speed] [--work-dir DIR] [--markdown]
"""

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

DEFAULT_FORMATS = "int4_awq,nvfp4,fp8,int8_wo"
# TinyLlama-1.1B's shape: 1.10 B parameters, 2.2 GB in bf16.
LLAMA_1B = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=False)
# A small Llama: 268 M parameters in its Linears (full multi-head attention), 66 M in the embeddings.
LLAMA_270M = dict(LLAMA_1B, hidden_size=1024, intermediate_size=4096, num_hidden_layers=16, num_attention_heads=16,
                  num_key_value_heads=16)
SHAPES = {"1b": LLAMA_1B, "270m": LLAMA_270M}
SPEED_THREADS = (1, 2)
MIB = 2**20


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--formats", default=DEFAULT_FORMATS,
                        help=f"comma-separated qformats (default {DEFAULT_FORMATS})")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/hf_ptq_load_memory"),
                        help="where the synthetic checkpoint is written (reused when present)")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="1b", help="the synthetic model's shape")
    parser.add_argument("--layers", type=int, help="fewer for a quick run (default: the shape's)")
    parser.add_argument("--sections", default="load", help="comma-separated: load (default), speed")
    parser.add_argument("--repeats", type=int, default=1, help="runs per case; the table shows the median")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    parser.add_argument("--glibc-mmap-threshold", type=int,
                        help="MALLOC_MMAP_THRESHOLD_ for the measured processes (see above)")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # internal: run one case in this process
    return parser.parse_args()


def shape_config(shape: str, layers) -> dict:
    config = SHAPES[shape]
    return dict(config, num_hidden_layers=layers or config["num_hidden_layers"])


def make_checkpoint(directory: Path, shape: str, layers) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = shape_config(shape, layers)
    prefix = "llama" if shape == "1b" else f"llama-{shape}"  # the 1b checkpoints keep their earlier names
    path = directory / f"{prefix}-{config['num_hidden_layers']}l-bf16"
    if (path / "config.json").exists():
        return path
    torch.manual_seed(0)
    config = LlamaConfig(**config, dtype="bfloat16")
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.to_empty(device="cpu").to(torch.bfloat16)
    for tensor in model.state_dict().values():  # small random weights, like a trained model's scale
        if tensor.dim() > 1:
            tensor.normal_(0, 0.02)
        else:
            tensor.fill_(1.0)
    model.save_pretrained(path)
    return path


def rss_anon() -> int:
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"RssAnon:\s+(\d+) kB", status).group(1)) * 1024


class PeakSampler(threading.Thread):
    """Samples RssAnon until stopped; `peak` is the largest value seen."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak, self._done = rss_anon(), threading.Event()

    def run(self):
        while not self._done.wait(0.001):
            self.peak = max(self.peak, rss_anon())

    def stop(self) -> int:
        self._done.set()
        self.join()
        return max(self.peak, rss_anon())


def run_case(checkpoint: Path, case: str) -> dict:
    """Load once in this process; the numbers as a dict."""
    import torch
    from transformers import AutoModelForCausalLM

    import hf_ptq_plugin
    from hf_ptq_plugin import QuantLinear

    plain = case in ("bf16", "bf16+read")
    kwargs = {} if plain else {"quantization_config": hf_ptq_plugin.PTQConfig(qformat=case)}
    baseline = rss_anon()
    sampler = PeakSampler()
    sampler.start()
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16, **kwargs)
    if case == "bf16+read":  # page every weight in, as a quantizing load must: the like-for-like baseline
        for parameter in model.parameters():
            parameter.sum()
    seconds = time.perf_counter() - start
    peak = sampler.stop() - baseline
    quantized = sum(b.numel() * b.element_size() for m in model.modules() if isinstance(m, QuantLinear)
                    for b in m.buffers())
    return {"case": case, "seconds": seconds, "peak_anon": peak, "quantized_bytes": quantized,
            "footprint": model.get_memory_footprint()}


def measure(checkpoint: Path, case: str, repeats: int, mmap_threshold=None) -> dict:
    env = dict(os.environ)
    if mmap_threshold is not None:
        env["MALLOC_MMAP_THRESHOLD_"] = str(mmap_threshold)
    runs = []
    for _ in range(repeats):
        out = subprocess.run([sys.executable, __file__, "--child", case, "--work-dir", str(checkpoint)],
                             capture_output=True, text=True, check=True, env=env)
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    runs.sort(key=lambda r: r["seconds"])
    return runs[len(runs) // 2]


def print_table(rows, markdown: bool):
    plain, read = rows[0], rows[1]
    header = ["load", "wall s", "x plain", "x plain+read", "peak anon MiB", "quantized MiB", "peak / quantized",
              "footprint MiB"]
    lines = [[r["case"], f"{r['seconds']:.1f}", f"{r['seconds'] / plain['seconds']:.2f}",
              f"{r['seconds'] / read['seconds']:.2f}", f"{r['peak_anon'] / MIB:.0f}",
              f"{r['quantized_bytes'] / MIB:.0f}" if r["quantized_bytes"] else "-",
              f"{r['peak_anon'] / r['quantized_bytes']:.2f}" if r["quantized_bytes"] else "-",
              f"{r['footprint'] / MIB:.0f}"] for r in rows]
    print_lines(header, lines, markdown)


def print_lines(header, lines, markdown: bool):
    if markdown:
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        for line in lines:
            print("| " + " | ".join(line) + " |")
        return
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    for line in [header] + lines:
        print("  ".join(cell.rjust(w) for cell, w in zip(line, widths)))


def layer_weights(shape: str) -> list:
    """One decoder layer's Linear weights of the shape, bf16 (N, K), small random values."""
    import torch

    c = SHAPES[shape]
    hidden, inter = c["hidden_size"], c["intermediate_size"]
    kv = hidden // c["num_attention_heads"] * c["num_key_value_heads"]
    shapes = [(hidden, hidden), (kv, hidden), (kv, hidden), (hidden, hidden), (inter, hidden), (inter, hidden),
              (hidden, inter)]
    generator = torch.Generator().manual_seed(0)
    return [(torch.randn(n, k, generator=generator) * 0.02).bfloat16() for n, k in shapes]


def quantize_speed(shape: str, formats: list, markdown: bool) -> None:
    """Weights/s of the quantize step alone, load path (native where it applies) and torch's ops."""
    import torch

    from hf_ptq_plugin import get_format
    from hf_ptq_plugin.backends.native_quantize import quantize_weight_native
    from hf_ptq_plugin.numerics.weights import quantize_weight_in_row_blocks

    weights = layer_weights(shape)
    count = sum(w.numel() for w in weights)
    saved_threads = torch.get_num_threads()
    rows = []
    for threads in SPEED_THREADS:
        torch.set_num_threads(threads)
        for name in formats:
            fmt = get_format(name)
            native_applies = quantize_weight_native(weights[0], fmt) is not None
            row = {"case": name, "threads": threads, "native": native_applies}
            for path, quantize in (("load", quantize_weight_native if native_applies else None),
                                   ("torch", quantize_weight_in_row_blocks)):
                if quantize is not None:
                    row[path] = count / median_seconds(quantize, weights, fmt, reps=5)
            rows.append(row)
    torch.set_num_threads(saved_threads)
    print_speed_table(rows, count, markdown)


def median_seconds(quantize, weights, fmt, reps: int) -> float:
    """Median over `reps` of the seconds all `weights` take, each timed after a heap trim (see above)."""
    from hf_ptq_plugin.hf.memory import release_freed_heap

    times = []
    for _ in range(reps + 1):  # the first round warms up: the library's first call
        seconds = 0.0
        for w in weights:
            release_freed_heap()
            start = time.perf_counter()
            quantize(w, fmt)
            seconds += time.perf_counter() - start
        times.append(seconds)
    return statistics.median(times[1:])


def print_speed_table(rows, count: int, markdown: bool):
    print(f"quantize step alone: one layer's Linear weights ({count / 1e6:.1f} M), bf16, median of 5")
    header = ["qformat", "threads", "load path", "G weights/s", "per thread", "torch G weights/s", "per thread",
              "speed-up"]
    lines = []
    for r in rows:
        load = r.get("load", r["torch"])
        lines.append([r["case"], str(r["threads"]), "native" if r["native"] else "torch", f"{load / 1e9:.2f}",
                      f"{load / 1e9 / r['threads']:.2f}", f"{r['torch'] / 1e9:.2f}",
                      f"{r['torch'] / 1e9 / r['threads']:.2f}", f"{load / r['torch']:.1f}"])
    print_lines(header, lines, markdown)


def main():
    args = parse_args()
    if args.child:
        print(json.dumps(run_case(args.work_dir, args.child)))
        return
    sections = args.sections.split(",")
    unknown = set(sections) - {"load", "speed"}
    if unknown:
        raise SystemExit(f"unknown section(s) {sorted(unknown)}; choose from load, speed")
    if "load" in sections:
        checkpoint = make_checkpoint(args.work_dir, args.shape, args.layers)
        rows = [measure(checkpoint, case, args.repeats, args.glibc_mmap_threshold)
                for case in ["bf16", "bf16+read"] + args.formats.split(",")]
        print_table(rows, args.markdown)
    if "speed" in sections:
        quantize_speed(args.shape, args.formats.split(","), args.markdown)


if __name__ == "__main__":
    main()
