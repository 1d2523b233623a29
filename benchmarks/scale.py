"""An 8B model on a machine a quarter its size: quantize Llama-3-8B to INT4 at load under a 6 GiB limit.

A synthetic Llama-3-8B (its exact shape: hidden 4096, intermediate 14336, 32 layers, 32 heads, 8 KV
heads, vocab 128256, rope_theta 500000, untied embeddings; seeded random weights with a few outlier
channels, so that AWQ has something to find) is written once as ~16 GB of bf16 safetensors, one shard
per decoder layer, tensor by tensor: the whole model never exists in memory. Its tokenizer is
SmolLM2's (`smollm2.py`); token ids above its vocabulary are simply never used.

Each algorithm (AWQ = `awq_lite`, GPTQ) then runs in its own process:
`from_pretrained(path, quantization_config=PTQConfig(qformat="int4_awq", algorithm=..., calib_dataset=
<Austen>))` (16 samples x 512 tokens of Jane Austen, `austen.py`), then `export_checkpoint` for vLLM
(compressed-tensors) and TensorRT-LLM (the unified checkpoint). The parent samples the child's resident
anonymous memory (`RssAnon`, /proc/<pid>/status) every 10 ms and kills it above `--limit-gb`: no cgroup
is usable here without root (`systemd-run --user` has no bus; cgroup v2 has no memory controller).
Memory-mapped checkpoint pages are file-backed and do not count. A spike shorter than the 10 ms
between samples can pass unseen.

Time split (from outside the library, by wrapping its functions in the child; it has no timing hooks):
- read: `from_pretrained` up to calibration (model set-up; embeddings, norms and lm_head stay memory-mapped;
  the loader hands every Linear weight to the quantizer, which only allocates its buffers, because
  calibration re-reads the weights) plus each block's re-read of its full-precision weights from the
  checkpoint (`sources.restore_full_precision`: allocate, read, copy);
- calibration: tokenizing the text, the capture pass (the model's own forward with the blocks and the
  output head bypassed: embeddings), each block's statistics pass and its feed pass;
- search: the rest of calibration: the AWQ scale search or the GPTQ solve, rounding and packing into
  QuantLinears, folding scales into norms, loading the tokenizer.
Each step also records CPU seconds (all threads) and its peak RssAnon: CPU / wall near the number of
free cores means the GEMMs are the limit, much lower means the disk (or other work on the machine).
Before each case the checkpoint's pages are dropped from the page cache (posix_fadvise DONTNEED on its
files only), so reading is from disk (`--keep-page-cache`: not).

Correctness: on a small model of the same family (`--check-layers 2 --check-hidden 1024`), each export is
loaded back in a fresh model and its layer-0 outputs compared with the in-memory quantized model's,
bit for bit: the unified (TensorRT-LLM) checkpoint through hf_ptq_plugin in bf16 (same buffers, same
kernels), the compressed-tensors (vLLM) one through transformers' compressed-tensors support in fp32
against our model in fp32 on its reference path (`reference_forward`). That loader decompresses to dense
weights, so only F.linear on the same exact weights in fp32 can agree bit for bit; its bf16 GEMM, and our
INT4 kernel in any dtype, sum and round differently.

    nice -n 19 python benchmarks/scale.py [--work-dir DIR] [--algorithms awq,gptq] [--layers 32] [--markdown]
    nice -n 19 python benchmarks/scale.py --layers 2   # full width, 2 layers: a few minutes per algorithm
    nice -n 19 python benchmarks/scale.py --layers 2 --hidden 1024   # about a minute per algorithm
"""

import argparse
import functools
import gc
import importlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from synthetic_llama3 import LLAMA3_8B, llama3_shape, make_checkpoint  # benchmarks/ is on sys.path
from tables import print_table

ALGORITHMS = {"awq": "awq_lite", "gptq": "gptq"}  # short names; any PTQConfig algorithm name works too
HEADER = ["algorithm", "read s", "calibration s", "search s", "write vLLM s", "write TRT-LLM s", "total s",
          "peak RSS anon GiB", "killed?"]
GIB = 2**30
SAMPLE_SECONDS = 0.01
EXPORT_TARGETS = ("vllm", "trtllm")
PASSES = ("tokenize", "capture", "statistics", "feed")  # the calibration column's steps


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/hf_ptq_scale"),
                        help="synthetic checkpoints (reused when present) and exports")
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "hf_ptq_plugin",
                        help="SmolLM2's tokenizer and the Austen text, prepared once")
    parser.add_argument("--algorithms", default="awq,gptq", help="comma-separated: awq, gptq or algorithm names")
    parser.add_argument("--layers", type=int, default=LLAMA3_8B["layers"])
    parser.add_argument("--hidden", type=int, default=LLAMA3_8B["hidden"])
    parser.add_argument("--intermediate", type=int, help="default: 3.5 x hidden (14336 at 4096)")
    parser.add_argument("--vocab", type=int, default=LLAMA3_8B["vocab"])
    parser.add_argument("--limit-gb", type=float, default=6.0, help="kill a case above this RssAnon (GiB)")
    parser.add_argument("--calib-samples", type=int, default=16)
    parser.add_argument("--calib-seq-len", type=int, default=512)
    parser.add_argument("--calib-batch-size", type=int, default=4)
    parser.add_argument("--sequential", choices=("default", "yes", "no"), default="default",
                        help="PTQConfig.sequential: the format's default, True or False")
    parser.add_argument("--check-layers", type=int, default=2, help="the layer-0 check's model")
    parser.add_argument("--check-hidden", type=int, default=1024)
    parser.add_argument("--no-check", action="store_true", help="skip the layer-0 check")
    parser.add_argument("--tokenizer", type=Path, help="tokenizer folder (default: SmolLM2's)")
    parser.add_argument("--calib-file", type=Path, help="calibration text (default: five Austen novels)")
    parser.add_argument("--keep-exports", action="store_true", help="keep the exported checkpoints")
    parser.add_argument("--keep-page-cache", action="store_true", help="do not evict the checkpoint first")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # internal: one case, as JSON
    return parser.parse_args(argv)


def evict_page_cache(checkpoint: Path) -> None:
    """Drop the checkpoint files' pages from the page cache (theirs only), so reading hits the disk."""
    for file in checkpoint.glob("*.safetensors"):
        fd = os.open(file, os.O_RDONLY)
        try:
            os.fsync(fd)  # dirty pages cannot be dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def default_inputs(args) -> tuple:
    """(tokenizer folder, calibration text file): SmolLM2's tokenizer and five Austen novels, made once."""
    tokenizer = args.tokenizer
    if tokenizer is None:
        from smollm2 import smollm2_checkpoint

        tokenizer = smollm2_checkpoint(args.cache_dir)
    calib = args.calib_file or args.cache_dir / "austen_calibration.txt"
    if not calib.exists():
        from austen import calibration_and_eval_texts

        partial = calib.with_suffix(".partial")
        partial.write_text(calibration_and_eval_texts(args.cache_dir)[0], encoding="utf-8")
        partial.rename(calib)  # a complete file or none (the file `make demo` uses)
    return tokenizer, calib


# --- memory ---------------------------------------------------------------------------------------------

def rss(pid="self") -> dict:
    """{"RssAnon": bytes, "RssFile": bytes} of a process; {} once it has exited."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return {}
    return {key: int(kb) * 1024 for key, kb in re.findall(r"(RssAnon|RssFile):\s+(\d+) kB", status)}


def run_watched(cmd, limit_bytes: int, interval: float = SAMPLE_SECONDS) -> dict:
    """Run `cmd`, sampling its RssAnon every `interval` s; SIGKILL it above `limit_bytes`.
    {"returncode", "peak" (bytes), "killed"}."""
    proc = subprocess.Popen(cmd)
    peak, killed = 0, False
    while proc.poll() is None and not killed:
        anon = rss(proc.pid).get("RssAnon", 0)
        peak, killed = max(peak, anon), anon > limit_bytes
        if killed:
            proc.kill()
        time.sleep(interval)
    return {"returncode": proc.wait(), "peak": peak, "killed": killed}


class PhaseSampler(threading.Thread):
    """In the child: the peak RssAnon of each phase (`phase(name)` starts the next one), and within it of each
    timing bucket that is running (`Buckets` sets `bucket`), e.g. "load/search"."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peaks, self.current, self.bucket, self._done = {}, None, None, threading.Event()

    def _sample(self):
        if self.current is not None:
            anon = rss().get("RssAnon", 0)
            for key in (self.current, f"{self.current}/{self.bucket or 'other'}"):
                self.peaks[key] = max(self.peaks.get(key, 0), anon)

    def run(self):
        while not self._done.wait(SAMPLE_SECONDS):
            self._sample()

    def phase(self, name):
        self._sample()
        self.current = name
        self._sample()


# --- timing ---------------------------------------------------------------------------------------------

class Buckets:
    """Wall and CPU seconds spent inside wrapped library functions, per bucket."""

    def __init__(self, sampler: PhaseSampler):
        self.wall, self.cpu, self.sampler = {}, {}, sampler

    def wrap(self, module: str, name: str, bucket: str) -> None:
        owner = importlib.import_module(module)
        original = getattr(owner, name)  # AttributeError when the library moved it: the split would be wrong

        @functools.wraps(original)
        def timed(*args, **kwargs):
            wall, cpu, outer = time.perf_counter(), time.process_time(), self.sampler.bucket
            self.sampler.bucket = "search" if bucket == "calibrate" else bucket  # calibrate's own time: the search
            try:
                return original(*args, **kwargs)
            finally:
                self.sampler.bucket = outer
                self.wall[bucket] = self.wall.get(bucket, 0.0) + time.perf_counter() - wall
                self.cpu[bucket] = self.cpu.get(bucket, 0.0) + time.process_time() - cpu

        setattr(owner, name, timed)


def install_timers(sampler: PhaseSampler) -> Buckets:
    buckets = Buckets(sampler)
    buckets.wrap("hf_ptq_plugin.hf.quantizer", "calibrate_while_loading", "calibrate")
    buckets.wrap("hf_ptq_plugin.calibration.sources", "restore_full_precision", "read")  # allocates and copies
    buckets.wrap("hf_ptq_plugin.calibration.calibrate", "_loop_from", "tokenize")
    buckets.wrap("hf_ptq_plugin.calibration.streamed", "capture_block_inputs", "capture")
    buckets.wrap("hf_ptq_plugin.calibration.streamed", "run_block", "feed")  # a quantized block's outputs
    buckets.wrap("hf_ptq_plugin.calibration.algorithms.base", "statistics_pass", "statistics")
    buckets.wrap("hf_ptq_plugin.calibration.algorithms.gptq", "statistics_pass", "statistics")
    return buckets


# --- one case, in the child -----------------------------------------------------------------------------

def run_case(spec: dict) -> None:
    """Quantize-while-loading, export for each engine, optionally the layer-0 check; results to spec["result"]
    after every phase, so a killed case still tells how far it got."""
    sampler = PhaseSampler()
    sampler.start()
    buckets = install_timers(sampler)
    import torch
    from transformers import AutoModelForCausalLM

    from hf_ptq_plugin import PTQConfig, QuantLinear, export_checkpoint
    from hf_ptq_plugin.hf.memory import release_freed_heap

    result = {"algorithm": case_name(spec["algorithm"], spec["sequential"])}

    def record(**values):
        result.update(values, phase_peaks=dict(sampler.peaks), cpu=dict(buckets.cpu), wall=dict(buckets.wall))
        Path(spec["result"] + ".partial").write_text(json.dumps(result))
        os.replace(spec["result"] + ".partial", spec["result"])

    config = PTQConfig(qformat="int4_awq", algorithm=spec["algorithm"], calib_dataset=spec["calib_file"],
                       calib_size=spec["samples"], calib_seq_len=spec["seq_len"],
                       calib_batch_size=spec["batch_size"], sequential=spec["sequential"])
    sampler.phase("load")
    record(baseline_anon=rss()["RssAnon"])
    start, cpu = time.perf_counter(), time.process_time()
    model = AutoModelForCausalLM.from_pretrained(spec["checkpoint"], quantization_config=config,
                                                 dtype=torch.bfloat16)
    load, load_cpu = time.perf_counter() - start, time.process_time() - cpu
    after_load = rss()
    gc.collect()
    release_freed_heap()  # what the allocator held but no tensor used
    wall = buckets.wall
    calibrate, passes = wall.get("calibrate", 0.0), sum(wall.get(b, 0.0) for b in PASSES)
    quantized = sum(b.numel() * b.element_size() for m in model.modules() if isinstance(m, QuantLinear)
                    for b in m.buffers())
    dense = sum(p.numel() * p.element_size() for p in model.parameters())
    record(load_s=load, load_cpu_s=load_cpu, read_s=load - calibrate + wall.get("read", 0.0), calibration_s=passes,
           search_s=calibrate - wall.get("read", 0.0) - passes, after_load=after_load, after_trim=rss(),
           quantized_bytes=quantized, unquantized_bytes=dense)
    exports = {target: Path(spec["out_dir"]) / target for target in EXPORT_TARGETS}
    for target, folder in exports.items():
        sampler.phase(f"write {target}")
        start = time.perf_counter()
        export_checkpoint(model, folder, target=target)
        record(**{f"write_{target}_s": time.perf_counter() - start})
        if not spec["check"] and not spec["keep_exports"]:  # timed: the next export can have its disk space
            shutil.rmtree(folder)
    if spec["check"]:
        sampler.phase("check")
        record(check=layer0_check(model, exports, spec["checkpoint"], spec["seq_len"]))
    sampler.phase(None)
    record(done=True)


class _Stop(Exception):
    """Ends a forward pass once layer 0 has run."""


def layer0_output(model, ids):
    import torch

    captured = {}

    def keep(module, args, output):
        captured["out"] = (output[0] if isinstance(output, tuple) else output).detach().clone()
        raise _Stop

    handle = model.model.layers[0].register_forward_hook(keep)
    try:
        with torch.no_grad():
            model(ids)
    except _Stop:
        pass
    finally:
        handle.remove()
    return captured["out"]


def layer0_check(model, exports: dict, checkpoint: str, seq_len: int) -> dict:
    """Layer-0 outputs of each export loaded back in a fresh model against the in-memory model's (module
    docstring); `differs_from_source`: the unquantized checkpoint's differ, so the comparison can fail."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_ptq_plugin.modules.quant_linear import reference_forward

    text = Path(model.ptq_config.calib_dataset).read_text(encoding="utf-8")[:100_000]
    length = min(seq_len, 128)
    ids = torch.tensor(AutoTokenizer.from_pretrained(checkpoint)(text)["input_ids"][:2 * length]).view(2, length)
    expected = layer0_output(model, ids)
    source = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16)
    differs = not torch.equal(layer0_output(source, ids), expected)
    del source
    unified = AutoModelForCausalLM.from_pretrained(exports["trtllm"], dtype=torch.bfloat16)
    unified_loader = type(unified.hf_quantizer).__name__
    unified_equal = torch.equal(layer0_output(unified, ids), expected)
    del unified
    torch.nn.Module.float(model)  # exact (bf16 -> fp32); transformers' .float() refuses quantized models
    with reference_forward(model):  # F.linear on the dense fp32 weights, as transformers' decompressed layers
        expected = layer0_output(model, ids)
    compressed = AutoModelForCausalLM.from_pretrained(exports["vllm"], dtype=torch.float32)
    got = layer0_output(compressed, ids)
    return {"differs_from_source": differs, "trtllm_loader": unified_loader, "trtllm_bf16_equal": unified_equal,
            "vllm_loader": type(compressed.hf_quantizer).__name__, "vllm_fp32_equal": torch.equal(got, expected),
            "vllm_fp32_max_abs_diff": (got - expected).abs().max().item()}


# --- the parent -----------------------------------------------------------------------------------------

# Bytes per weight of an int4_awq export: the packed codes and one fp32 scale per group of 128.
INT4_EXPORT_BYTES = 0.5 + 4 / 128
LAYER_LINEAR = re.compile(r"layers\.\d+\..*_proj\.weight$")


def require_disk_space(checkpoint: Path, out_dir: Path, exports_at_once: int) -> None:
    """Refuses to start an hour of calibration whose exports cannot be written: each is about the decoder
    Linears at INT4_EXPORT_BYTES per weight plus every other tensor as stored (the checkpoint's headers)."""
    from safetensors import safe_open

    export = 0.0
    for shard in checkpoint.glob("*.safetensors"):
        with safe_open(str(shard), "pt") as f:
            for name in f.keys():
                count = math.prod(f.get_slice(name).get_shape())
                export += count * (INT4_EXPORT_BYTES if LAYER_LINEAR.search(name) else 2)  # bf16 otherwise
    out_dir.mkdir(parents=True, exist_ok=True)
    needed, free = export * exports_at_once, shutil.disk_usage(out_dir).free
    if free < needed:
        raise SystemExit(f"{out_dir}: {exports_at_once} export(s) of {checkpoint.name} need about "
                         f"{needed / 1e9:.1f} GB; {free / 1e9:.1f} GB are free (use another --work-dir or free some)")


def case_name(algorithm: str, sequential) -> str:
    return algorithm if sequential is None else f"{algorithm}, sequential={sequential}"


def measure(checkpoint: Path, algorithm: str, args, calib_file: Path, check: bool) -> dict:
    """One case in a watched child process; its results, the watchdog's peak and whether it was killed."""
    out_dir = args.work_dir / "exports" / f"{checkpoint.name}-{algorithm}"
    result_file = args.work_dir / f"result-{checkpoint.name}-{algorithm}.json"
    result_file.unlink(missing_ok=True)
    sequential = {"default": None, "yes": True, "no": False}[args.sequential]
    spec = {"checkpoint": str(checkpoint), "algorithm": algorithm, "calib_file": str(calib_file),
            "samples": args.calib_samples, "seq_len": args.calib_seq_len, "batch_size": args.calib_batch_size,
            "sequential": sequential, "out_dir": str(out_dir), "result": str(result_file), "check": check,
            "keep_exports": args.keep_exports}
    require_disk_space(checkpoint, out_dir, exports_at_once=len(EXPORT_TARGETS) if check or args.keep_exports else 1)
    if not args.keep_page_cache:
        evict_page_cache(checkpoint)
    watched = run_watched([sys.executable, __file__, "--child", json.dumps(spec)], int(args.limit_gb * GIB))
    name = case_name(algorithm, sequential)
    result = json.loads(result_file.read_text()) if result_file.exists() else {"algorithm": name}
    if not args.keep_exports:
        shutil.rmtree(out_dir, ignore_errors=True)
    return {**result, **watched}


def table_row(r: dict) -> list:
    def seconds(key):
        return f"{r[key]:.1f}" if key in r else "-"

    total = [r.get(k) for k in ("load_s", "write_vllm_s", "write_trtllm_s")]
    status = "yes" if r["killed"] else ("no" if r.get("done") else f"crashed (rc {r['returncode']})")
    return [r["algorithm"], seconds("read_s"), seconds("calibration_s"), seconds("search_s"), seconds("write_vllm_s"),
            seconds("write_trtllm_s"), f"{sum(total):.1f}" if None not in total else "-",
            f"{r['peak'] / GIB:.2f}", status]


def details(r: dict) -> str:
    """What the table leaves out: peaks by phase and step, memory after loading, seconds and CPU use per step."""
    line = f"{r['algorithm']}: peak RssAnon GiB by phase/step: " + (", ".join(
        f"{phase} {peak / GIB:.2f}" for phase, peak in r.get("phase_peaks", {}).items()) or "-")
    if "after_load" in r:
        line += (f"; after loading RssAnon {r['after_load']['RssAnon'] / GIB:.2f} GiB ("
                 f"{r['after_trim']['RssAnon'] / GIB:.2f} once freed heap is returned), RssFile "
                 f"{r['after_load']['RssFile'] / GIB:.2f} GiB; QuantLinear tensors "
                 f"{r['quantized_bytes'] / GIB:.2f} GiB, other parameters {r['unquantized_bytes'] / GIB:.2f} GiB; "
                 f"before loading {r['baseline_anon'] / GIB:.2f} GiB; wall s (CPU/wall): load {r['load_s']:.1f} "
                 f"({r['load_cpu_s'] / r['load_s']:.2f}), " + ", ".join(
                     f"{b} {r['wall'][b]:.1f} ({r['cpu'][b] / max(r['wall'][b], 1e-9):.2f})"
                     for b in ("read", *PASSES, "calibrate") if b in r["wall"]))
    return line


def check_line(r: dict, shape: dict) -> tuple:
    """(text, passed) of one algorithm's layer-0 check."""
    c = r.get("check")
    where = f"{shape['num_hidden_layers']} layers, hidden {shape['hidden_size']}"
    if c is None:
        return f"layer-0 check {r['algorithm']} ({where}): did not finish (killed? {table_row(r)[-1]})", False
    passed = c["trtllm_bf16_equal"] and c["vllm_fp32_equal"] and c["differs_from_source"]
    text = (f"layer-0 check {r['algorithm']} ({where}): {'PASS' if passed else 'FAIL'}: TRT-LLM (unified) export "
            f"reloaded by {c['trtllm_loader']} in bf16: {'equal' if c['trtllm_bf16_equal'] else 'DIFFERENT'}; "
            f"vLLM (compressed-tensors) export reloaded by {c['vllm_loader']} in fp32: "
            f"{'equal' if c['vllm_fp32_equal'] else 'DIFFERENT'} (max |diff| {c['vllm_fp32_max_abs_diff']:.3g}); "
            f"unquantized source {'differs' if c['differs_from_source'] else 'IS EQUAL (check cannot fail)'}")
    return text, passed


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        run_case(json.loads(args.child))
        return 0
    algorithms = [ALGORITHMS.get(a, a) for a in args.algorithms.split(",")]
    tokenizer, calib_file = default_inputs(args)
    shape = llama3_shape(args.layers, args.hidden, args.intermediate, args.vocab)
    checkpoint = make_checkpoint(args.work_dir, shape, tokenizer, args.seed)
    rows = [measure(checkpoint, algorithm, args, calib_file, check=False) for algorithm in algorithms]
    print(f"{checkpoint.name}: int4_awq, {args.calib_samples} x {args.calib_seq_len} tokens, "
          f"limit {args.limit_gb:g} GiB RssAnon")
    print_table(HEADER, [table_row(r) for r in rows], args.markdown, width=17)
    print("\n".join(details(r) for r in rows))
    failed = any(r["returncode"] != 0 and not r["killed"] for r in rows)
    if not args.no_check:
        check_shape = llama3_shape(args.check_layers, args.check_hidden, None, args.vocab)
        check_checkpoint = make_checkpoint(args.work_dir, check_shape, tokenizer, args.seed)
        for algorithm in algorithms:
            text, passed = check_line(measure(check_checkpoint, algorithm, args, calib_file, check=True), check_shape)
            print(text)
            failed = failed or not passed
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
