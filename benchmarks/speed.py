"""Speed of QuantLinear's CPU paths against unquantized fp32 and bf16; prints Markdown.

Sections (all by default):
  bandwidth   this machine's memory bandwidth (sum = read, copy = read + write)
  candidates  the torch CPU kernels a path could use, at 4096 x 4096 (why each format uses its kernel)
  w8a8rows    W8A8's int8pack against torch._int_mm by rows (where cpu_linear switches)
  gemm        Llama-3-8B layer shapes (K, N) in {4096, 14336}, M = 1 and 64: every format, bf16 and
              fp32 activations, time, speed-up over bf16 and weight bytes/s the chosen kernel reads
  widechunks  the same shapes at M = 512 and 2048, fp32 x (prefill, calibration passes): the native
              kernels decoding 256 weight rows at a time or wide chunks, against dense fp32 and bf16
  model       a synthetic ~1.1B Llama: decode (batch 1, --new-tokens) and prefill (--prefill tokens)
  smollm2     SmolLM2-135M-Instruct greedy decode (batch 1, 64 new tokens)

Usage: python benchmarks/speed.py [--sections gemm,model] [--model-formats int4_awq,fp8] [--quick]
Times are medians; the CPU may be shared with other jobs, so compare rows of one run.
"""

import argparse
import copy
import functools
import gc
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F_nn
from smollm2 import smollm2_checkpoint
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from hf_ptq_plugin import FORMATS, PTQConfig, QuantLinear, get_format, quantize
from hf_ptq_plugin.backends import native
from hf_ptq_plugin.modules.layer_plan import LayerPlan

GEMM_SHAPES = ((4096, 4096), (4096, 14336), (14336, 4096))  # (K, N): q/o, gate/up, down of Llama-3-8B
# Under algorithm "max" the *_awq variants have no pre_quant_scale and run exactly nvfp4's path.
MODEL_FORMATS = [name for name in FORMATS if name != "nvfp4_awq"]
SMOLLM2_FORMATS = ["int4_awq", "int8_wo", "int8_sq", "fp8", "fp8_pc_pt", "nvfp4", "w4a16_nvfp4", "mxfp8"]


def median_seconds(fn, reps: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    print("\n".join(lines) + "\n", flush=True)


def bandwidth(args) -> float:
    """Measured GB/s of a streaming read (the bound for a memory-bound GEMV); prints both probes."""
    a = torch.ones(128 * 1024 * 1024)  # 512 MB, far beyond the caches
    b = torch.empty_like(a)
    read = a.nbytes / median_seconds(a.sum, 7)
    copy_ = 2 * a.nbytes / median_seconds(lambda: b.copy_(a), 7)
    print(f"### Memory bandwidth ({torch.get_num_threads()} threads)\n")
    table(["probe", "GB/s"], [["sum (read)", f"{read / 1e9:.1f}"], ["copy (read + write)", f"{copy_ / 1e9:.1f}"]])
    return read


def candidates(args) -> None:
    """The CPU kernels each path could use, timed on one (4096 x 4096) layer."""
    k = n = 4096
    w = torch.randn(n, k) * 0.02
    q4 = torch.randint(0, 16, (n, k), dtype=torch.int32)
    int4 = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q4, 1)
    sz = {dt: torch.randn(k // 128, n, 2).to(dt) for dt in (torch.float32, torch.bfloat16)}
    w8 = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    fp16 = torch.ops.quantized.linear_prepack_fp16(w, None)
    wb, w_fp8 = w.bfloat16(), w.to(torch.float8_e4m3fn)
    lut = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    rows = []
    for m in (1, 64):
        x = torch.randn(m, k)
        xb = x.bfloat16()
        x8 = torch.randint(-127, 128, (m, k), dtype=torch.int8)
        probes = {
            "fp32 F.linear": lambda: F_nn.linear(x, w),
            "bf16 F.linear": lambda: F_nn.linear(xb, wb),
            "fbgemm fp16 weight, fp32 x": lambda: torch.ops.quantized.linear_dynamic_fp16(x, fp16),
            "int4pack, bf16 x": lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(xb, int4, 128, sz[torch.bfloat16]),
            "int4pack, fp32 x": lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x, int4, 128, sz[torch.float32]),
            "int8pack, bf16 x": lambda: torch.ops.aten._weight_int8pack_mm(xb, w8, torch.ones(n, dtype=torch.bfloat16)),
            "int8pack, fp32 x": lambda: torch.ops.aten._weight_int8pack_mm(x, w8, torch.ones(n)),
            "_int_mm int8 x int8": lambda: torch._int_mm(x8, w8.t()),
            "fp8 -> fp32 cast, per call": lambda: w_fp8.float(),
            "fp8 -> fp32 lookup table, per call": lambda: lut[w_fp8.view(torch.uint8).long()],
        }
        for name, fn in probes.items():
            seconds = median_seconds(fn, 5 if m == 1 else 3)
            rows.append([m, name, f"{seconds * 1e3:.2f}", f"{2 * m * k * n / seconds / 1e9:.1f}"])
    print(f"### CPU kernel candidates, one 4096 x 4096 layer ({torch.get_num_threads()} threads)\n")
    table(["M", "kernel", "ms", "GFLOP/s"], rows)


def w8a8_rows(args) -> None:
    """W8A8's two kernels by the number of rows, on 4096 x 4096 (what cpu_linear.INT_MM_MIN_ROWS rests on).

    Eight weights in turn (134 MB, more than the last-level cache), so each call reads its weight
    from memory as a model's layers do.
    """
    k = n = 4096
    weights = [torch.randint(-127, 128, (n, k), dtype=torch.int8) for _ in range(8)]
    bf16_weights = [torch.randn(n, k, dtype=torch.bfloat16) for _ in range(4)]
    ones = torch.ones(n, dtype=torch.bfloat16)
    rows = []
    for m in (1, 2, 4, 8, 12, 16, 32, 64):
        codes = torch.randint(-127, 128, (m, k), dtype=torch.int8)
        as_bf16 = codes.bfloat16()
        probes = {"int8pack (bf16 codes)": lambda i: torch.ops.aten._weight_int8pack_mm(as_bf16, weights[i % 8], ones),
                  "_int_mm": lambda i: torch._int_mm(codes, weights[i % 8].t()),
                  "bf16 F.linear": lambda i: F_nn.linear(as_bf16, bf16_weights[i % 4])}
        times = {name: median_seconds(_cycling(fn), 5) for name, fn in probes.items()}
        rows.append([m] + [f"{seconds * 1e3:.2f}" for seconds in times.values()])
    print(f"### W8A8 kernel by rows, 4096 x 4096 ({torch.get_num_threads()} threads)\n")
    table(["M", "int8pack ms", "_int_mm ms", "bf16 F.linear ms"], rows)


def _cycling(fn):
    """fn(0), fn(1), ... on successive calls."""
    calls = iter(range(1 << 30))
    return lambda: fn(next(calls))


def kernel_weight_bytes(module: nn.Module) -> int:
    """Bytes of weight the kernel a layer runs reads per call."""
    if not isinstance(module, QuantLinear):
        return module.weight.nbytes
    cache = module.cpu_weight_cache
    if cache.kind == "int8pack":
        return module.weight.nbytes
    if cache.kind == "native":  # the checkpoint's codes and scales, and any scales converted for the kernel
        return sum(t.nbytes for t in module.weight_buffers().values() if t is not None) + cache.nbytes
    return cache.nbytes


def gemm(args, read_bandwidth: float) -> None:
    print(f"### GEMMs at Llama-3-8B layer shapes ({torch.get_num_threads()} threads)\n")
    print("x: the activation dtype; vs bf16: the unquantized bf16 F.linear of the same M, timed next to the "
          "row; GB/s: weight bytes the kernel reads (its cached form) per second at M = 1.\n")
    for k, n in GEMM_SHAPES:
        torch.manual_seed(0)
        linear = nn.Linear(k, n, bias=False, dtype=torch.bfloat16)
        linear.weight.data.normal_(0, 0.02)
        baselines = {torch.float32: copy.deepcopy(linear).float(), torch.bfloat16: linear}
        layers = {name: QuantLinear.from_linear(linear, get_format(name), plan=LayerPlan(input_amax=torch.tensor(4.0)))
                  for name in args.formats}
        rows = []
        for dtype in (torch.bfloat16, torch.float32):  # outermost: a layer caches one dtype's form at a time
            variants = [("unquantized", baselines[dtype]), *layers.items()]
            cells = {name: [] for name, _ in variants}
            for m in (1, 64):
                reps = 10 if m == 1 else 2
                x, x_bf16 = torch.randn(m, k).to(dtype), torch.randn(m, k, dtype=torch.bfloat16)
                bf16_seconds = median_seconds(lambda: linear(x_bf16), reps)
                for name, layer in variants:
                    seconds = median_seconds(lambda: layer(x), reps)
                    cells[name] += [f"{seconds * 1e3:.2f}", f"{bf16_seconds / seconds:.2f}x"]
                    if m == 1:
                        rate = kernel_weight_bytes(layer) / seconds
                        cells[name] += [f"{rate / 1e9:.1f}", f"{100 * rate / read_bandwidth:.0f}%"]
            for name, layer in variants:
                kind = layer.cpu_weight_cache.kind if isinstance(layer, QuantLinear) else "F.linear"
                rows.append([name, str(dtype)[6:], kind, *cells[name]])
        print(f"K x N = {k} x {n}\n")
        table(["weights", "x", "kernel", "M=1 ms", "vs bf16", "GB/s", "% read BW", "M=64 ms", "vs bf16"], rows)
        del layers, baselines
        gc.collect()


def wide_chunks(args) -> None:
    """Many-row fp32 products (prefill, calibration's passes) through the native kernels: decoding CHUNK_ROWS
    weight rows at a time against up to WIDE_CHUNK_ELEMENTS weights, next to torch's dense fp32 and bf16 GEMMs."""
    print(f"### Wide decode chunks: fp32 x at many rows ({torch.get_num_threads()} threads)\n")
    rows = []
    for k, n in GEMM_SHAPES:
        torch.manual_seed(0)
        linear = nn.Linear(k, n, bias=False, dtype=torch.bfloat16)
        linear.weight.data.normal_(0, 0.02)
        dense = copy.deepcopy(linear).float()
        layers = {name: QuantLinear.from_linear(linear, get_format(name), plan=LayerPlan(input_amax=torch.tensor(4.0)))
                  for name in args.formats}
        for m in (512, 2048):
            x = torch.randn(m, k)
            x_bf16, flop = x.bfloat16(), 2 * m * k * n
            cells = [("unquantized bf16 F.linear", lambda: linear(x_bf16)),
                     ("unquantized fp32 F.linear", lambda: dense(x))]
            for name, layer in layers.items():
                for label, min_rows in (("256-row chunks", 10**9), ("wide chunks", 0)):
                    cells.append((f"{name}, {label}", functools.partial(_with_wide_from, min_rows, layer, x)))
            for label, call in cells:
                seconds = median_seconds(call, 2)
                rows.append([f"{k} x {n}", str(m), label, f"{seconds * 1e3:.0f}", f"{flop / seconds / 1e9:.0f}"])
        layers = dense = None  # before the next shape's weights
        gc.collect()
    table(["K x N", "M", "product", "ms", "GFLOP/s"], rows)


def _with_wide_from(min_rows: int, layer, x):
    wide, native.WIDE_CHUNK_MIN_ROWS = native.WIDE_CHUNK_MIN_ROWS, min_rows
    try:
        return layer(x)
    finally:
        native.WIDE_CHUNK_MIN_ROWS = wide


def synthetic_llama(args) -> LlamaForCausalLM:
    size = dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=4) if args.quick else \
        dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16)
    config = LlamaConfig(num_attention_heads=32 if not args.quick else 8, num_key_value_heads=8, vocab_size=32000,
                         max_position_embeddings=4096, tie_word_embeddings=False, **size)
    torch.manual_seed(0)
    return LlamaForCausalLM._from_config(config, dtype=torch.bfloat16).eval()


def measure_model(model, ids_prompt, ids_prefill, new_tokens: int, repeats: int):
    """(decode tokens/s, prefill tokens/s), medians of `repeats` runs; greedy, batch 1, caches built
    by a warm-up first."""
    generate = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        model.generate(ids_prompt, **{**generate, "max_new_tokens": 2, "min_new_tokens": 2})  # builds CPU caches
        decode = median_seconds(lambda: model.generate(ids_prompt, **generate), repeats, warmup=0)
        prefill = median_seconds(lambda: model(ids_prefill), repeats, warmup=0) if ids_prefill is not None else None
    return new_tokens / decode, (ids_prefill.shape[1] / prefill if prefill else None)


def decode_weight_bytes(model) -> int:
    """Weight bytes one decode step reads through the Linear layers (embedding rows are negligible)."""
    return sum(kernel_weight_bytes(mod) for mod in model.modules() if isinstance(mod, (nn.Linear, QuantLinear)))


def model_section(args, read_bandwidth: float) -> None:
    base = synthetic_llama(args)
    params = sum(p.numel() for p in base.parameters())
    torch.manual_seed(1)
    prompt = torch.randint(0, 32000, (1, 8))
    prefill = torch.randint(0, 32000, (1, args.prefill))
    calib = torch.randint(0, 32000, (1, 16))
    results = []
    for name, dtype in [("unquantized", torch.float32), ("unquantized", torch.bfloat16)] + \
            [(f, torch.bfloat16) for f in args.model_formats]:
        model = copy.deepcopy(base).to(dtype)
        start = time.perf_counter()
        if name != "unquantized":
            quantize(model, PTQConfig(qformat=name, algorithm="max"), forward_loop=lambda m: m(calib))
        quantize_seconds = time.perf_counter() - start
        decode, prefill_rate = measure_model(model, prompt, prefill, args.new_tokens, args.repeats)
        results.append((name, dtype, decode, prefill_rate, decode_weight_bytes(model), quantize_seconds))
        print(f"  done: {name} {dtype} decode {decode:.2f} tok/s, prefill {prefill_rate:.1f} tok/s", flush=True)
        del model
        gc.collect()
    fp32, bf16 = results[0], results[1]
    rows = [[name, str(dtype)[6:], f"{decode:.2f}", f"{decode / bf16[2]:.2f}x", f"{decode / fp32[2]:.2f}x",
             f"{prefill_rate:.1f}", f"{prefill_rate / bf16[3]:.2f}x", f"{weight_bytes / 1e9:.2f}",
             f"{weight_bytes * decode / 1e9:.1f}", f"{100 * weight_bytes * decode / read_bandwidth:.0f}%",
             f"{quantize_seconds:.0f}"]
            for name, dtype, decode, prefill_rate, weight_bytes, quantize_seconds in results]
    print(f"### Synthetic Llama, {params / 1e9:.2f}B parameters ({torch.get_num_threads()} threads)\n")
    table(["weights", "activations", "decode tok/s", "vs bf16", "vs fp32", f"prefill {args.prefill} tok/s",
           "prefill vs bf16", "weight GB/token", "weight GB/s", "% of read BW", "quantize s"], rows)


def smollm2_section(args) -> None:
    path = smollm2_checkpoint(Path(args.cache_dir))
    tokenizer = AutoTokenizer.from_pretrained(path)
    prompt = tokenizer("The capital of France is", return_tensors="pt").input_ids
    results = []
    for name, dtype in [("unquantized", torch.float32), ("unquantized", torch.bfloat16)] + \
            [(f, torch.bfloat16) for f in args.smollm2_formats]:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
        if name != "unquantized":
            group = 64 if get_format(name).group_size_choices else None  # 576 is not a multiple of 128
            quantize(model, PTQConfig(qformat=name, algorithm="max", group_size=group),
                     forward_loop=lambda m: m(prompt))
        rate, _ = measure_model(model, prompt, None, 64, args.repeats)
        results.append((name, dtype, rate))
        print(f"  done: {name} {dtype} {rate:.1f} tok/s", flush=True)
        del model
        gc.collect()
    bf16_rate = results[1][2]
    print(f"### SmolLM2-135M-Instruct greedy decode, 64 new tokens ({torch.get_num_threads()} threads)\n")
    table(["weights", "activations", "tok/s", "vs bf16"],
          [[name, str(dtype)[6:], f"{rate:.1f}", f"{rate / bf16_rate:.2f}x"] for name, dtype, rate in results])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", default="bandwidth,candidates,w8a8rows,gemm,widechunks,model,smollm2")
    parser.add_argument("--formats", default=",".join(FORMATS), help="formats of the gemm section")
    parser.add_argument("--model-formats", default=",".join(MODEL_FORMATS))
    parser.add_argument("--smollm2-formats", default=",".join(SMOLLM2_FORMATS))
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per model measurement (median)")
    # Prefill throughput is GEMM-bound and flat in length from M ~ 64 on, so longer prefills only
    # cost time (minutes per variant in bf16 on a CPU without native bf16 instructions).
    parser.add_argument("--prefill", type=int, default=128)
    parser.add_argument("--cache-dir", default="/tmp/hfptq_cache")
    parser.add_argument("--quick", action="store_true", help="a 4-layer 512-wide model (a smoke run)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    for key in ("formats", "model_formats", "smollm2_formats"):
        setattr(args, key, [f for f in getattr(args, key).split(",") if f])
    sections = args.sections.split(",")
    torch.set_grad_enabled(False)  # inference only: no autograd graphs in any timing
    start, load_at_start = time.perf_counter(), f"{os.getloadavg()[0]:.1f}"
    read_bandwidth = bandwidth(args)
    if "candidates" in sections:
        candidates(args)
    if "w8a8rows" in sections:
        w8a8_rows(args)
    if "gemm" in sections:
        gemm(args, read_bandwidth)
    if "widechunks" in sections:
        wide_chunks(args)
    if "model" in sections:
        model_section(args, read_bandwidth)
    if "smollm2" in sections:
        smollm2_section(args)
    print(f"total {time.perf_counter() - start:.0f} s, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"load average at start {load_at_start}, at end {os.getloadavg()[0]:.1f} (the CPU is shared)")


if __name__ == "__main__":
    main()
