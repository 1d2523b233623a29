"""`get_memory_footprint()` against the memory a loaded quantized model really takes, per format.

The synthetic 1.1 B Llama of `load_memory.py` (TinyLlama's shape, random bf16 weights) is quantized
once per format (`quantize()` with round to nearest, activation scales from one batch of random
tokens) and saved; each checkpoint is then loaded in its own process, which runs one decode step
(one token: CPU paths build their derived weights on the first forward) and then one 64-token
prefill. Resident growth is VmRSS after each step minus before the load (anonymous and file pages:
the checkpoint's tensors stay memory-mapped from its safetensors files), with glibc told to return
large freed blocks at once (MALLOC_MMAP_THRESHOLD_), so that it counts live memory, not what the
allocator keeps. It is compared with `get_memory_footprint()` minus the input embedding: a decode
step reads one row of that memory-mapped table, so the rest of it never becomes resident. Bytes
per weight: the quantized Linears' bytes over their weight elements, at rest (checkpoint buffers),
at decode and after prefill (plus derived weights). `--dtype float32` loads the checkpoints as an fp32
model: its unquantized tensors are then converted copies, the input embedding included (so it counts).

    python benchmarks/footprint.py [--formats fp8,int4_awq] [--dtype float32] [--work-dir DIR] [--markdown]
"""

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from load_memory import LLAMA_1B, MIB, make_checkpoint  # benchmarks/ is on sys.path
from tables import print_table

DEFAULT_FORMATS = "fp8,fp8_pc_pt,int8_sq,int8_wo,int4_awq,w4a8_awq,nvfp4,nvfp4_awq,w4a16_nvfp4,mxfp8"
MMAP_THRESHOLD = 131072


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--formats", default=DEFAULT_FORMATS)
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/hf_ptq_load_memory"))
    parser.add_argument("--layers", type=int, default=LLAMA_1B["num_hidden_layers"])
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                        help="the dtype the quantized checkpoints are loaded in (they are saved from bf16)")
    parser.add_argument("--markdown", action="store_true")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)  # internal: (quantize|load, checkpoint)
    return parser.parse_args()


def rss() -> int:
    """Resident bytes of this process, anonymous and file-backed: a loaded checkpoint's tensors are
    memory-mapped from its safetensors files, so they are file pages once touched."""
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) * 1024


def quantized_checkpoint(source: Path, qformat: str) -> Path:
    """`source` quantized to `qformat` (round to nearest) and saved next to it, once."""
    target = source.parent / f"{source.name}-{qformat}"
    if not (target / "config.json").exists():
        subprocess.run([sys.executable, __file__, "--child", "quantize", str(source), "--formats", qformat],
                       check=True)
    return target


def quantize_child(source: Path, qformat: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from hf_ptq_plugin import PTQConfig, quantize

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16)
    ids = torch.randint(0, LLAMA_1B["vocab_size"], (1, 64))
    quantize(model, PTQConfig(qformat=qformat, algorithm="max"), forward_loop=lambda m: m(input_ids=ids))
    model.save_pretrained(source.parent / f"{source.name}-{qformat}")


def quantized_bytes(model) -> tuple:
    """(bytes of the quantized Linears' buffers, bytes of their CPU derived weights, their weight elements)."""
    from hf_ptq_plugin import QuantLinear
    from hf_ptq_plugin.hf.footprint import derived_weight_bytes

    linears = [m for m in model.modules() if isinstance(m, QuantLinear)]
    buffers = sum(b.numel() * b.element_size() for m in linears for b in m.buffers())
    return buffers, derived_weight_bytes(model), sum(m.in_features * m.out_features for m in linears)


def load_child(checkpoint: Path, dtype_name: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    import hf_ptq_plugin  # noqa: F401  registers the quantizer
    from hf_ptq_plugin.backends import native

    with torch.no_grad():  # the runtime's own one-time allocations first: they are not the model's
        torch.ones(8, 8) @ torch.ones(8, 8)
        x, w = torch.ones(64, 2048, dtype=torch.bfloat16), torch.ones(256, 2048, dtype=torch.bfloat16)
        torch.nn.functional.linear(x, w)  # oneDNN's bf16 GEMM state
        torch.nn.functional.linear(x.float(), w.float())
        native.library()  # the CPU kernels' shared library and its OpenMP threads
    baseline = rss()
    dtype = getattr(torch, dtype_name)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype).eval()
    loaded = rss() - baseline
    rest, _, elements = quantized_bytes(model)
    with torch.no_grad():
        model(input_ids=torch.ones(1, 1, dtype=torch.long))
    decode = {"rss": rss() - baseline, "footprint": model.get_memory_footprint(),
              "derived": quantized_bytes(model)[1]}
    with torch.no_grad():
        model(input_ids=torch.ones(1, 64, dtype=torch.long))
    prefill = {"rss": rss() - baseline, "footprint": model.get_memory_footprint(),
               "derived": quantized_bytes(model)[1]}
    embedding = model.get_input_embeddings().weight
    mapped = embedding.dtype == torch.bfloat16  # the checkpoint's own tensor, memory-mapped; else a converted copy
    return {"loaded": loaded, "rest": rest, "elements": elements, "decode": decode, "prefill": prefill,
            "embedding": embedding.numel() * embedding.element_size() if mapped else 0}


def measure(checkpoint: Path, dtype: str) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)}
    out = subprocess.run([sys.executable, __file__, "--child", "load", str(checkpoint), "--dtype", dtype],
                         capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def row(qformat: str, r: dict) -> list:
    per_weight = lambda extra: f"{(r['rest'] + extra) / r['elements']:.3f}"  # noqa: E731
    decode, prefill = r["decode"], r["prefill"]
    return [qformat, per_weight(0), per_weight(decode["derived"]), per_weight(prefill["derived"]),
            f"{decode['footprint'] / MIB:.0f}", f"{decode['rss'] / MIB:.0f}",
            f"{decode['rss'] / (decode['footprint'] - r['embedding']) - 1:+.1%}",
            f"{prefill['rss'] / (prefill['footprint'] - r['embedding']) - 1:+.1%}"]


def main():
    args = parse_args()
    if args.child:
        mode, path = args.child
        if mode == "quantize":
            quantize_child(Path(path), args.formats)
        else:
            print(json.dumps(load_child(Path(path), args.dtype)))
        return
    source = make_checkpoint(args.work_dir, "1b", args.layers)
    rows = []
    for qformat in args.formats.split(","):
        result = measure(quantized_checkpoint(source, qformat), args.dtype)
        print(f"done: {qformat} {result}", flush=True)
        rows.append(row(qformat, result))
    header = ["qformat", "bytes/weight at rest", "at decode", "after prefill", "footprint MiB (decode)",
              "RSS growth MiB (decode)", "RSS vs footprint - embedding, decode",
              "same, after prefill"]
    print(f"model: synthetic Llama, {args.layers} layers of TinyLlama-1.1B's shape, saved from bf16, loaded in "
          f"{args.dtype}; glibc MALLOC_MMAP_THRESHOLD_={MMAP_THRESHOLD}")
    print_table(header, rows, args.markdown)


if __name__ == "__main__":
    main()
