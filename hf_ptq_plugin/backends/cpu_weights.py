"""The CPU compute form of a QuantLinear's weight: built once from the checkpoint buffers, cached.

On a CPU, dequantizing the checkpoint tensors on every call is far too slow (an fp8 -> fp32 cast
of a weight takes many times longer than the GEMM it would feed), so each layer keeps its weight in
the form a fast kernel takes: the checkpoint's own codes for the native kernels, else a derived copy
for torch's. Chosen by measurement (BENCHMARKS.md, "CPU speed per format"):

  kind      used for                            what is cached                 extra memory
  native    any activation dtype, every format  nothing: `native.py`'s kernels  none (int4_awq,
            but int8_sq                         decode the checkpoint codes     fp8_pb_wo: fp32 scales
                                                inside the dot product          if the checkpoint's are not;
                                                                                w4a8_awq: fp32 group ratios)
  int8pack  int8_sq (any activation dtype), and nothing (reads `weight`)       int8_wo: N bf16 ones
            bf16 int8_wo without the native
            kernels
  dense     fp32 / fp16 activations, without    the reference's fp32 weight     4 B/weight
            the native kernels
  int4pack  bf16 activations, int4_awq          torch's CPU int4 layout,       0.5 B/weight + scales
            without the native kernels          bf16 group scales
  fp16pack  bf16 activations, the other formats fbgemm's packed fp16 matrix    2 B/weight
            without the native kernels
  dense     bf16 activations, inside            the reference's weight         2 B/weight,
  (bf16)    `bf16_dense_weights` only           rounded to bf16                while inside

The native kernels take fp32 activations (bf16 and fp16 ones are widened first), so fp32 and fp16
models use them too and hold no copy of the weight; their fp32 sums run in another order than the
reference's F.linear (`modules.quant_linear.reference_forward` runs the reference itself, as a
loader that decompresses the checkpoint to dense weights does). `dense` runs the reference's own
F.linear on the reference's own operands, bit for bit. Without the native kernels, bf16 models
take torch's packed kernels, which are never coarser than bf16: fp16pack stores a matrix C with
W = C * out_scale, where `out_scale` is the per-tensor or per-channel factor the format lets us
pull out of the dot product; C is exact in fp16 for FP8 codes, NVFP4's e2m1 x e4m3 products,
W4A8's e4m3 weights and MXFP8 values of ordinary range, and rounded to fp16 (<= 2**-11 relative)
for fp8_pb_wo (its 128 x 128 tile scales cannot be pulled out) and INT4 layers torch's int4
kernel cannot take.

The cache is a plain attribute, not a buffer: it never enters state_dict (the checkpoint),
`.to(dtype)` cannot cast it, and deepcopy/pickle drop it. It remembers the buffer tensors it was
built from and their version counters, so any in-place update (load_state_dict, calibration,
`.copy_`) or replacement (`.to(device)`, assign=True loading) rebuilds it on the next call, as
does a change between bf16 and other activation dtypes for the forms built for one of them.
"""

import contextlib
import functools
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Optional

import torch

from .. import formats as F
from ..numerics import dequantize_weight, fp8_quantize, unpack_int4_rows, unpack_nibbles
from ..numerics.mx import mxfp8_dequantize
from ..numerics.nvfp4 import e2m1_values
from ..numerics.weights import WEIGHT_BUFFERS, w4a8_group_ratio
from . import native

INT4PACK_GROUP_SIZES = (32, 64, 128, 256)  # what torch's CPU int4 kernel accepts
INT8PACK_ALIGNMENT = 64  # bytes; see aligned_for_int8pack
INT4PACK_N_MULTIPLE = 16
# W8A8 takes native.w8a8 on the AVX2 build of the native kernels and torch._int_mm elsewhere, chosen by
# measurement (4096 x 4096 layer, 2 threads). AVX2: _int_mm 8 to 16 ms at M = 1 and 0.5 to 1 s at M = 64, slower
# than bf16 F.linear (3 to 8 ms, 0.2 to 0.3 s); native.w8a8 0.5 to 0.7 ms and about 40 ms. AVX-512: _int_mm
# 0.52 ms at M = 1 and 5.8 ms at M = 64, faster than bf16, so it stays there. Both sum exactly in int32.
W8A8_NATIVE_SIMD_WIDTHS = (8,)


@functools.cache
def fbgemm_available() -> bool:
    """fbgemm's fp16 GEMM exists on x86 builds of torch only."""
    return "fbgemm" in torch.backends.quantized.supported_engines


def _dropped():
    return None


@dataclass
class CpuWeight:
    """A layer's weight in a fast torch kernel's form; see the module docstring."""

    kind: str  # "native", "int4pack", "int8pack", "fp16pack" or "dense"
    sources: tuple  # ((name, tensor, data_ptr, version), ...) of the buffers it was built from
    # built for bf16 activations (torch's packed kernels), for other dtypes (dense), or None: for any (native, W8A8)
    bf16_activations: Optional[bool]
    # native: the checkpoint's codes; int4pack: uint8 (N, K/2); int8pack: the int8 weight; fp16pack: fbgemm
    # packed; dense: fp32 or bf16 (N, K)
    matrix: Any
    # native: the per-block scales the kernel reads (NVFP4's e4m3 codes, MXFP8's exponents, fp32 INT4 group
    # scales, W4A8 group ratios or fp8_pb_wo tile scales); int4pack: bf16 (K/g, N, 2) scales and zeros;
    # int8pack: bf16 ones (N,)
    scales: Optional[torch.Tensor] = None
    out_scale: Optional[torch.Tensor] = None  # fp32 () or (N,) multiplying the GEMM output
    nbytes: int = 0  # memory held beyond the checkpoint buffers
    # native: the kernel family of `native.py` ("fp8", "int8", "fp8_tiles", "mxfp8", "nvfp4", ...); int8pack: "w8a8"
    # when W8A8 runs `native.w8a8`
    layout: str = ""

    def is_current(self, module_buffers: dict, act_dtype: torch.dtype) -> bool:
        """Built from `module_buffers` (a module's `_buffers`) as they are now, for `act_dtype`?

        Runs on every forward (hundreds per decoded token), hence plain loops and no new objects.
        """
        if self.bf16_activations is not None and self.bf16_activations != (act_dtype == torch.bfloat16):
            return False
        for name, tensor, data_ptr, version in self.sources:
            current = module_buffers.get(name)
            if current is not tensor or (tensor is not None and (tensor.data_ptr() != data_ptr or (
                    version is not None and tensor._version != version))):
                return False
        return True

    def __reduce__(self):
        return (_dropped, ())  # deepcopy and pickle drop the cache; the next forward rebuilds it


@contextlib.contextmanager
def bf16_dense_weights(modules: Iterable) -> Iterator[None]:
    """Within the block, QuantLinears `modules` multiply bf16 activations with their dequantized
    weight rounded to bf16, on torch's native bf16 GEMM; on exit they go back to their kernels.

    For many-token passes that are not inference: calibration feeding a just-quantized decoder
    block's outputs on to the next block. At that many rows, on CPUs with native bf16 instructions,
    the packed INT4 / INT8 / fp16 kernels are much slower than bf16 F.linear (BENCHMARKS.md, "CPU
    speed per format"). The bf16 rounding of the weight (<= 2**-9 relative) is the size of
    int4pack's bf16 group scales. W8A8 keeps its exact int8 GEMM, which is faster than bf16 there.
    Costs 2 B/weight of the modules while inside.
    """
    modules = [m for m in modules if m.fmt.act != F.INT8]
    try:
        for module in modules:
            matrix = dequantize_weight(module.weight_buffers(), module.fmt, module.group_size).to(torch.bfloat16)
            module.cpu_weight_cache = CpuWeight("dense", _sources(module._buffers), True, matrix, nbytes=matrix.nbytes)
        yield
    finally:
        for module in modules:
            module.cpu_weight_cache = None  # the next call builds the layer's kernel form again


def aligned_for_int8pack(t: torch.Tensor) -> torch.Tensor:
    """t, or a copy of it at a 64-byte boundary (torch's own allocations always are).

    torch 2.13's AVX-512 `_weight_int8pack_mm` reads both operands with aligned vector loads and
    crashes (SIGSEGV) on a tensor that starts elsewhere, e.g. a weight memory-mapped from a
    safetensors file at a 24-byte offset, or an activation that is a view into a larger tensor.
    """
    t = t.contiguous()
    return t if t.data_ptr() % INT8PACK_ALIGNMENT == 0 else t.clone()


def _sources(buffers: dict) -> tuple:
    # Inference-mode tensors have no version counter; they cannot be updated in place outside
    # inference mode, so identity and storage pointer are what can change. Absent buffers are
    # recorded too, so one that appears later invalidates the cache.
    return tuple((name, t, None if t is None else t.data_ptr(), None if t is None or t.is_inference() else t._version)
                 for name, t in ((name, buffers.get(name)) for name in WEIGHT_BUFFERS))


@torch.no_grad()
def build_cpu_weight(fmt: F.Format, buffers: dict, group_size: int, act_dtype: torch.dtype) -> CpuWeight:
    """The cached compute form of one layer's weight (checkpoint tensors `buffers`) for activations of
    `act_dtype`: the native kernels' where they exist, else a packed torch kernel's for bf16 activations and
    the reference's `dense` for others (module docstring)."""
    sources, bf16 = _sources(buffers), act_dtype == torch.bfloat16
    n = buffers["weight_scale"].shape[0] if fmt.weight == F.INT4 else buffers["weight"].shape[0]
    native_weight = _native(fmt, buffers, group_size, sources)
    if native_weight is not None:
        return native_weight
    if fmt.weight == F.INT8 and fmt.act == F.INT8:  # W8A8: torch._int_mm, which reads any alignment, or native.w8a8
        layout = "w8a8" if _native_w8a8(buffers["weight"]) else ""
        return CpuWeight("int8pack", sources, None, buffers["weight"], None, buffers["weight_scale"], layout=layout)
    if not bf16:  # torch's packed kernels are slow or absent for fp32 / fp16 activations
        dense = dequantize_weight(buffers, fmt, group_size)
        return CpuWeight("dense", sources, False, dense, nbytes=dense.nbytes)
    if fmt.weight == F.INT4 and fmt.act is None and n % INT4PACK_N_MULTIPLE == 0 and group_size in INT4PACK_GROUP_SIZES:
        return _int4pack(buffers, sources)
    if fmt.weight == F.INT8:
        ones = torch.ones(n, dtype=torch.bfloat16)
        weight = aligned_for_int8pack(buffers["weight"])
        extra = ones.nbytes + (0 if weight is buffers["weight"] else weight.nbytes)
        return CpuWeight("int8pack", sources, True, weight, ones, buffers["weight_scale"], extra)
    matrix, out_scale = _factored_weight(fmt, buffers, group_size)
    half = matrix.half()
    if fbgemm_available() and _fp16_holds(matrix, half):
        packed = torch.ops.quantized.linear_prepack_fp16(matrix, None)
        return CpuWeight("fp16pack", sources, True, packed, out_scale=out_scale, nbytes=half.nbytes)
    dense = dequantize_weight(buffers, fmt, group_size)
    return CpuWeight("dense", sources, True, dense, nbytes=dense.nbytes)


def _native_w8a8(matrix: torch.Tensor) -> bool:
    """Whether W8A8's int8 weight `matrix` (N, K) takes `native.w8a8` (see W8A8_NATIVE_SIMD_WIDTHS): a contiguous
    int8 matrix whose K the kernel takes (a multiple of native.BLOCK, within its exact int32 bound)."""
    k = matrix.shape[-1]
    return (native.simd_width() in W8A8_NATIVE_SIMD_WIDTHS and matrix.dtype == torch.int8 and matrix.dim() == 2
            and matrix.is_contiguous() and k % native.BLOCK == 0 and k <= native.W8A8_MAX_K)


def _native(fmt: F.Format, buffers: dict, group_size: int, sources: tuple) -> Optional[CpuWeight]:
    """The `native` kind for the formats `native.py`'s kernels decode, or None (no kernels, or another format)."""
    q = buffers["weight"]
    in_features = q.shape[-1] * (2 if fmt.weight == F.NVFP4 else 1)  # NVFP4 packs two codes per byte along K
    if native.library() is None or in_features % native.BLOCK or not q.is_contiguous():
        return None
    if fmt.weight == F.FP8 and fmt.weight_granularity in (F.PER_TENSOR, F.PER_CHANNEL):
        return CpuWeight("native", sources, None, q.view(torch.uint8), out_scale=buffers["weight_scale"].float(),
                         layout="fp8")
    if fmt.weight == F.INT8 and fmt.act is None:  # W8A8 keeps torch's exact int8 x int8 GEMM
        return CpuWeight("native", sources, None, q.view(torch.uint8), out_scale=buffers["weight_scale"].float(),
                         layout="int8")
    if fmt.weight == F.FP8 and fmt.weight_granularity == F.PER_TILE and group_size % native.BLOCK == 0:
        scales = buffers["weight_scale"].float().contiguous()
        extra = 0 if scales.data_ptr() == buffers["weight_scale"].data_ptr() else scales.nbytes
        return CpuWeight("native", sources, None, q.view(torch.uint8), scales, torch.ones(()), extra,
                         layout="fp8_tiles")
    if fmt.weight == F.MXFP8:
        exponents = buffers["weight_scale"].contiguous()
        return CpuWeight("native", sources, None, q.view(torch.uint8), exponents, torch.ones(()), layout="mxfp8")
    if fmt.weight == F.NVFP4:
        block_scales = buffers["weight_scale"].contiguous().view(torch.uint8)
        return CpuWeight("native", sources, None, q, block_scales, buffers["weight_scale_2"].float(), layout="nvfp4")
    if fmt.weight == F.INT4 and group_size % native.BLOCK == 0 and fmt.fp8_weight_scale_2:
        ratios = w4a8_group_ratio(buffers["weight_scale"], buffers["weight_scale_2"]).contiguous()
        return CpuWeight("native", sources, None, q, ratios, buffers["weight_scale_2"].float(), ratios.nbytes,
                         layout="w4a8")
    if fmt.weight == F.INT4 and group_size % native.BLOCK == 0:
        scales = buffers["weight_scale"].float().contiguous()  # no copy when the checkpoint's are fp32
        extra = 0 if scales.data_ptr() == buffers["weight_scale"].data_ptr() else scales.nbytes
        return CpuWeight("native", sources, None, q, scales, torch.ones(()), extra, layout="int4")
    return None


def _fp16_holds(matrix: torch.Tensor, half: torch.Tensor) -> bool:
    """True if fp16 keeps every row within 2**-11 of its amax (finer than bf16 activations).

    Exact for FP8 codes and NVFP4 / W4A8 values; rounded but within this for ordinary fp8_pb_wo,
    INT4 and MXFP8 weights; false for rows too large or too tiny for fp16's range.
    """
    if not torch.isfinite(half).all():
        return False
    error = (half.float() - matrix).abs().amax(dim=1)
    return bool((error <= 2.0**-11 * matrix.abs().amax(dim=1)).all())


def _int4pack(buffers: dict, sources: tuple) -> CpuWeight:
    # torch's layout wants unsigned nibbles and dequantizes (u - 8) * scale + zero: u = q + 8, zero = 0.
    unsigned = unpack_int4_rows(buffers["weight"]).to(torch.int32) + 8  # (N, K)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(unsigned, 1)  # (N, K / 2) uint8
    scale_t = buffers["weight_scale"].t().to(torch.bfloat16)  # (K / g, N)
    scales_and_zeros = torch.stack((scale_t, torch.zeros_like(scale_t)), dim=-1).contiguous()
    return CpuWeight("int4pack", sources, True, packed, scales_and_zeros,
                     nbytes=packed.nbytes + scales_and_zeros.nbytes)


def _factored_weight(fmt: F.Format, buffers: dict, group_size: int):
    """(C fp32 (N, K), out_scale fp32 () or (N,)) with W = C * out_scale; C is fp16-exact where the format allows."""
    q, scale = buffers["weight"], buffers["weight_scale"]
    if fmt.weight in (F.FP8, F.INT8) and fmt.weight_granularity in (F.PER_TENSOR, F.PER_CHANNEL):
        return q.float(), scale.float()  # e4m3 or int8 codes
    if fmt.weight == F.NVFP4:
        codes = unpack_nibbles(q)  # e2m1 x e4m3: <= 6 significant bits in [2**-10, 2688]
        return e2m1_values(codes) * scale.float().repeat_interleave(16, dim=1), buffers["weight_scale_2"].float()
    if fmt.weight == F.INT4 and fmt.fp8_weight_scale_2:
        # The e4m3 values of `numerics.weights.int4_w4a8_weight`, before its final * weight_scale_2.
        scale_2 = buffers["weight_scale_2"].float()
        ratio = w4a8_group_ratio(scale, scale_2).repeat_interleave(group_size, dim=1)
        return fp8_quantize(unpack_int4_rows(q).float() * ratio, torch.ones(())).float(), scale_2
    if fmt.weight == F.MXFP8:
        return mxfp8_dequantize(q, scale), torch.ones(())  # e4m3 times 2**e: exact in fp16 for ordinary e
    # fp8_pb_wo (its tile scales cannot be pulled out) and INT4 (its group scales cannot either)
    return dequantize_weight(buffers, fmt, group_size), torch.ones(())
