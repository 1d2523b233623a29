"""The native dequantize-GEMV kernels of `native_gemv.c`: built once per machine, called through ctypes.

The C files (`SOURCES`: these kernels, the weight quantizers of `native_quantize.c`, which
`native_quantize.py` wraps, and the NVFP4 fake quantizers of `native_fake_quantize.c`) are compiled on
first use with the system's C compiler for this CPU (`-march=native`) into one library in the user's cache
(`$XDG_CACHE_HOME/hf_ptq_plugin/native`, named by a hash of the sources and flags, so an upgrade rebuilds it,
and only the KEPT_BUILDS newest builds stay); later processes load the built library at once. Plain C without
torch's headers keeps the build to about a second. The kernels need AVX-512, or AVX2 with F16C and FMA; so do
the weight quantizers (AVX-512 with BW, VL and F16C, or AVX2 with F16C and FMA), which `quantize_library()`
offers where the library holds them. Without a compiler, without AVX-512 or AVX2 (+F16C, FMA), or with
`HF_PTQ_PLUGIN_NATIVE=0`, `library()` is None and the CPU backend keeps torch's own kernels.

`w8a8` is W8A8's int8 x int8 product with exact int32 sums (torch._int_mm's result, faster on AVX2).

Each call passes raw data pointers of contiguous CPU tensors; ctypes releases the GIL for it.
"""

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Optional

import torch

from . import cpu_blas

logger = logging.getLogger(__name__)
_scratch = threading.local()

SOURCE = Path(__file__).with_name("native_gemv.c")
SOURCES = (SOURCE, Path(__file__).with_name("native_quantize.c"), Path(__file__).with_name("native_fake_quantize.c"))
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")
ENV_SWITCH = "HF_PTQ_PLUGIN_NATIVE"
SIMD_WIDTHS = (16, 8)  # native_gemv.c's AVX-512 and AVX2 paths; 0 means it was built without either
QUANTIZE_SIMD_WIDTHS = (16, 8)  # native_quantize.c's AVX-512 and AVX2 paths; 0 means it was built without either
BLOCK = 16  # the kernels take K (in_features) and INT4 group sizes in multiples of 16 (one AVX-512 vector, two AVX2)
# hfptq_gemv_w8a8's int32 sums are exact up to this K (a multiple of BLOCK): K x 128 x 128 < 2**31
W8A8_MAX_K = 2**17 - BLOCK
KEPT_BUILDS = 3  # builds left in the cache after a new one: other installed versions may still load theirs
CHUNK_ROWS = 256  # weight rows `matmul_by_chunks` decodes at a time: 4 MB of fp32 at K = 4096
# From this many rows of x on, `matmul_by_chunks` decodes up to WIDE_CHUNK_ELEMENTS weights at a time (64 MB of
# fp32) into a buffer of the call's own: torch's GEMM on those wider chunks runs about as fast as on the whole
# dense weight, faster than on CHUNK_ROWS ones (BENCHMARKS.md, "Wide decode chunks"), and faulting in a fresh
# buffer costs far less than a product this size; the thread's small scratch buffer stays as it is.
WIDE_CHUNK_MIN_ROWS = 1024
WIDE_CHUNK_ELEMENTS = 2**24

_I64, _PTR = ctypes.c_int64, ctypes.c_void_p
SIGNATURES = {
    "hfptq_gemv_fp8": (_PTR, _I64, _I64, _PTR, _I64, _PTR, ctypes.c_int),
    "hfptq_gemv_int8": (_PTR, _I64, _I64, _PTR, _I64, _PTR, ctypes.c_int),
    "hfptq_gemv_nvfp4": (_PTR, _I64, _I64, _PTR, _PTR, _I64, _PTR, ctypes.c_int),
    "hfptq_gemv_int4": (_PTR, _I64, _I64, _PTR, _PTR, _I64, ctypes.c_int, _I64, _PTR, ctypes.c_int),
    "hfptq_gemv_mxfp8": (_PTR, _I64, _I64, _PTR, _PTR, _I64, _PTR, ctypes.c_int),
    "hfptq_gemv_fp8_tiles": (_PTR, _I64, _I64, _PTR, _PTR, _I64, _I64, _PTR, ctypes.c_int),
    "hfptq_gemv_w8a8": (_PTR, _I64, _I64, _PTR, _I64, _PTR, ctypes.c_int),  # int8 x int8, writes int32
    "hfptq_decode_fp8": (_PTR, _I64, _I64, _PTR, ctypes.c_int),  # writes fp32
    "hfptq_decode_int8": (_PTR, _I64, _I64, _PTR, ctypes.c_int),
    "hfptq_decode_nvfp4": (_PTR, _PTR, _I64, _I64, _PTR, ctypes.c_int),
    "hfptq_decode_int4": (_PTR, _PTR, _I64, ctypes.c_int, _I64, _I64, _PTR, ctypes.c_int),
    "hfptq_decode_mxfp8": (_PTR, _PTR, _I64, _I64, _PTR, ctypes.c_int),
    "hfptq_decode_fp8_tiles": (_PTR, _PTR, _I64, _I64, _I64, _I64, _PTR, ctypes.c_int),
}
# native_fake_quantize.c's fake quantizers return 1 when their input holds a NaN or an infinity
FAKE_QUANTIZE_SIGNATURES = {
    "hfptq_nvfp4_activation_fake_quantize": (_PTR, _I64, ctypes.c_float, _PTR, ctypes.c_int),
    "hfptq_nvfp4_weight_fake_quantize": (_PTR, _I64, ctypes.c_float, _PTR, ctypes.c_int),
}
# native_quantize.c's kernels return the largest 16-bit magnitude pattern they read (native_quantize.py)
QUANTIZE_SIGNATURES = {
    "hfptq_quantize_int4": (_PTR, _I64, _I64, _I64, ctypes.c_int, _PTR, _PTR, ctypes.c_int),
    "hfptq_quantize_int8": (_PTR, _I64, _I64, ctypes.c_int, _PTR, _PTR, ctypes.c_int),
    "hfptq_amax16": (_PTR, _I64, ctypes.c_int),
    "hfptq_quantize_fp8": (_PTR, _I64, ctypes.c_float, ctypes.c_int, _PTR, ctypes.c_int),
    "hfptq_quantize_nvfp4": (_PTR, _I64, _I64, ctypes.c_float, ctypes.c_float, ctypes.c_int, _PTR, _PTR,
                             ctypes.c_int),
}


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "hf_ptq_plugin" / "native"


def _build(compiler: str, target: Path) -> None:
    """Compile into a temporary file beside `target`, then rename: a concurrent process never loads half a file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=target.parent, suffix=".so", delete=False) as tmp:
        partial = Path(tmp.name)
    try:
        subprocess.run([compiler, *FLAGS, "-o", str(partial), *map(str, SOURCES)], check=True, capture_output=True,
                       text=True, timeout=120)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    _prune_builds(target.parent)


def _prune_builds(directory: Path) -> None:
    """Delete all but the KEPT_BUILDS newest libraries: each source change makes one. A process that has
    one loaded keeps its mapping; one about to load a deleted build falls back to torch's kernels."""
    builds = sorted(directory.glob("native_gemv-*.so"), key=lambda path: path.stat().st_mtime, reverse=True)
    for stale in builds[KEPT_BUILDS:]:
        stale.unlink(missing_ok=True)


@functools.cache
def library() -> Optional[ctypes.CDLL]:
    """The loaded kernels, or None where they cannot run (module docstring)."""
    if os.environ.get(ENV_SWITCH, "1") == "0" or not all(source.exists() for source in SOURCES):
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        logger.info("no C compiler: the CPU backend keeps torch's kernels, which hold a second copy of each weight")
        return None
    code = b"".join(source.read_bytes() for source in SOURCES)
    digest = hashlib.sha256(code + " ".join((compiler, *FLAGS)).encode()).hexdigest()[:16]
    target = _cache_dir() / f"native_gemv-{digest}.so"
    try:
        if not target.exists():
            _build(compiler, target)
        lib = ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError) as error:
        detail = getattr(error, "stderr", "") or error
        logger.warning("could not build the native CPU kernels (%s); torch's kernels are used instead", detail)
        return None
    if lib.hfptq_simd_width() not in SIMD_WIDTHS:
        return None
    for name, argtypes in SIGNATURES.items():
        getattr(lib, name).argtypes = argtypes
        getattr(lib, name).restype = None
    for name, argtypes in FAKE_QUANTIZE_SIGNATURES.items():
        getattr(lib, name).argtypes = argtypes
        getattr(lib, name).restype = ctypes.c_int
    if lib.hfptq_quantize_simd_width() in QUANTIZE_SIMD_WIDTHS:  # else built without them
        for name, argtypes in QUANTIZE_SIGNATURES.items():
            getattr(lib, name).argtypes = argtypes
            getattr(lib, name).restype = ctypes.c_uint32
    return lib


def quantize_library() -> Optional[ctypes.CDLL]:
    """`library()` where it also holds the weight quantizers of `native_quantize.c`, else None."""
    lib = library()
    return lib if lib is not None and lib.hfptq_quantize_simd_width() in QUANTIZE_SIMD_WIDTHS else None


def simd_width() -> int:
    """Which path of `native_gemv.c` the loaded library holds: 16 (AVX-512), 8 (AVX2), or 0 without the kernels."""
    lib = library()
    return 0 if lib is None else lib.hfptq_simd_width()


def _ptr(t: torch.Tensor) -> int:
    return t.data_ptr()


def gemv(layout: str, x: torch.Tensor, codes: torch.Tensor, n: int, scales: Optional[torch.Tensor] = None,
         group: int = 0) -> torch.Tensor:
    """fp32 (M, n): fp32 rows `x` (M, K) times the weight `codes` decode to, transposed. All contiguous.

    layout "fp8": codes e4m3 (n, K); "int8": int8 codes (n, K); "mxfp8": codes e4m3 and E8M0 exponents
    (n, K / 32); "fp8_tiles": codes e4m3 and fp32 scales (n / group, K / group); "nvfp4": codes (n, K / 2)
    and e4m3 block scales (n, K / 16), without the global scale; "int4": codes (n / 2, K) and fp32 group scales
    (n, K / group); "w4a8": as "int4" with W4A8's group ratios for scales, each product rounded to e4m3,
    without weight_scale_2. Per-tensor and per-channel scales are the caller's.
    """
    lib, threads = library(), torch.get_num_threads()
    m, k = x.shape
    y = torch.empty(m, n, dtype=torch.float32)
    if layout in ("fp8", "int8"):
        getattr(lib, f"hfptq_gemv_{layout}")(_ptr(x), m, k, _ptr(codes), n, _ptr(y), threads)
    elif layout in ("nvfp4", "mxfp8"):
        getattr(lib, f"hfptq_gemv_{layout}")(_ptr(x), m, k, _ptr(codes), _ptr(scales), n, _ptr(y), threads)
    elif layout == "fp8_tiles":
        lib.hfptq_gemv_fp8_tiles(_ptr(x), m, k, _ptr(codes), _ptr(scales), group, n, _ptr(y), threads)
    else:  # "int4", "w4a8"
        lib.hfptq_gemv_int4(_ptr(x), m, k, _ptr(codes), _ptr(scales), group, layout == "w4a8", n, _ptr(y), threads)
    return y


def nvfp4_fake_quantize(x: torch.Tensor, input_scale: float) -> Optional[torch.Tensor]:
    """NVFP4 activation fake quantization of fp32 `x` (..., K), K a multiple of 16, contiguous, under
    `input_scale`: a new fp32 tensor (`native_fake_quantize.c`), or None when x holds a NaN or an infinity."""
    return _fake_quantize(library().hfptq_nvfp4_activation_fake_quantize, x, input_scale)


def nvfp4_fake_quantize_weight(w: torch.Tensor, scale_2: float) -> Optional[torch.Tensor]:
    """NVFP4 weight fake quantization of fp32 `w` (..., K), K a multiple of 16, contiguous, under the second-level
    scale `scale_2`: a new fp32 tensor (`native_fake_quantize.c`), or None when w holds a NaN or an infinity."""
    return _fake_quantize(library().hfptq_nvfp4_weight_fake_quantize, w, scale_2)


def _fake_quantize(kernel, x: torch.Tensor, scale: float) -> Optional[torch.Tensor]:
    out = torch.empty_like(x)
    non_finite = kernel(_ptr(x), x.numel(), scale, _ptr(out), torch.get_num_threads())
    return None if non_finite else out


def w8a8(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """int32 (M, N): int8 codes `x` (M, K) times int8 codes `w` (N, K) transposed, exact int32 sums, so
    `torch._int_mm(x, w.t())` bit for bit. Both contiguous; K a multiple of BLOCK and at most W8A8_MAX_K."""
    (m, k), n = x.shape, w.shape[0]
    int8 = x.dtype == w.dtype == torch.int8
    if not int8 or w.shape[1] != k or not (x.is_contiguous() and w.is_contiguous()):
        raise ValueError("w8a8 takes contiguous int8 (M, K) and (N, K)")
    if k % BLOCK or k > W8A8_MAX_K:
        raise ValueError(f"w8a8 takes K a multiple of {BLOCK} up to {W8A8_MAX_K}, not {k}")
    y = torch.empty(m, n, dtype=torch.int32)
    library().hfptq_gemv_w8a8(_ptr(x), m, k, _ptr(w), n, _ptr(y), torch.get_num_threads())
    return y


def decode(layout: str, codes: torch.Tensor, n: int, k: int, scales: Optional[torch.Tensor] = None,
           group: int = 0, row0: int = 0, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The fp32 weight (n, k) that `codes` (the arguments of `gemv`) decode to, in `out` if given. For
    "fp8_tiles", `codes` may be rows row0.. of the weight and `scales` the whole weight's."""
    lib, threads = library(), torch.get_num_threads()
    out = torch.empty(n, k, dtype=torch.float32) if out is None else out
    if layout in ("fp8", "int8"):
        getattr(lib, f"hfptq_decode_{layout}")(_ptr(codes), n, k, _ptr(out), threads)
    elif layout in ("nvfp4", "mxfp8"):
        getattr(lib, f"hfptq_decode_{layout}")(_ptr(codes), _ptr(scales), n, k, _ptr(out), threads)
    elif layout in ("int4", "w4a8"):
        lib.hfptq_decode_int4(_ptr(codes), _ptr(scales), group, layout == "w4a8", n, k, _ptr(out), threads)
    else:
        lib.hfptq_decode_fp8_tiles(_ptr(codes), _ptr(scales), group, n, k, row0, _ptr(out), threads)
    return out


def _chunk_buffer(n: int, k: int) -> torch.Tensor:
    """A reused fp32 buffer for one decoded chunk, one per thread (at most CHUNK_ROWS x the widest layer's K: 15 MB
    at K = 14336). A fresh buffer each call would cost a page fault per 4 KB, more than decoding into it."""
    buffer = getattr(_scratch, "buffer", None)
    if buffer is None or buffer.numel() < n * k:
        buffer = _scratch.buffer = torch.empty(n * k, dtype=torch.float32)
    return buffer[:n * k].view(n, k)


def _chunk_rows(m: int, n: int, k: int) -> int:
    """Weight rows decoded at a time: CHUNK_ROWS, or for m >= WIDE_CHUNK_MIN_ROWS rows of x as many whole
    CHUNK_ROWS as WIDE_CHUNK_ELEMENTS hold (at least one, at most enough for all n rows)."""
    if m < WIDE_CHUNK_MIN_ROWS:
        return CHUNK_ROWS
    return max(CHUNK_ROWS, min(-(-n // CHUNK_ROWS), WIDE_CHUNK_ELEMENTS // (k * CHUNK_ROWS)) * CHUNK_ROWS)


def scratch_bytes() -> int:
    """Bytes of this thread's decode buffer (0 until a many-row call made one)."""
    buffer = getattr(_scratch, "buffer", None)
    return 0 if buffer is None else buffer.nbytes


def matmul_by_chunks(layout: str, x: torch.Tensor, codes: torch.Tensor, n: int, scales: Optional[torch.Tensor] = None,
                     group: int = 0) -> torch.Tensor:
    """`gemv`'s result for many rows of x: CHUNK_ROWS weight rows at a time decoded to fp32 for torch's fp32
    GEMM, so only one chunk (a few MB) exists beside the codes; wider chunks for WIDE_CHUNK_MIN_ROWS rows or more."""
    m, k = x.shape
    y_t = torch.empty(n, m, dtype=torch.float32)  # transposed: each chunk fills contiguous rows
    rows_per_code_row = 2 if layout in ("int4", "w4a8") else 1  # INT4 packs two weight rows per byte row
    chunk_rows = _chunk_rows(m, n, k)
    wide = torch.empty(chunk_rows * k, dtype=torch.float32) if chunk_rows > CHUNK_ROWS else None
    for start in range(0, n, chunk_rows):  # chunk_rows and n are even: an INT4 chunk starts on a byte row
        stop = min(n, start + chunk_rows)
        chunk_codes = codes[start // rows_per_code_row:stop // rows_per_code_row]
        chunk_scales = scales if scales is None or layout == "fp8_tiles" else scales[start:stop]
        buffer = _chunk_buffer(stop - start, k) if wide is None else wide[:(stop - start) * k].view(stop - start, k)
        weight = decode(layout, chunk_codes, stop - start, k, chunk_scales, group, start, buffer)
        cpu_blas.addmm_(y_t[start:stop], weight, x.t(), beta=0.0)
    return y_t.t().contiguous()  # a row-major output, as F.linear gives: attention kernels round by layout
