"""fp32 matrix products and Cholesky factorizations on CPU through OpenBLAS, where it beats torch's BLAS.

torch's CPU wheels multiply fp32 matrices with MKL, which on AMD CPUs runs well below their FMA rate; OpenBLAS's
kernels for the same CPUs are about a third faster (BENCHMARKS.md, "CPU BLAS"). Layer-streamed calibration is
mostly such products: the blocks' Linears over thousands of tokens, the input Hessians, GPTQ's factorizations
and AWQ's search go through `linear`, `mm`, `addmm_`, `add_upper_gram_` and `cholesky_lower_` here, which use
OpenBLAS only within `calibrating()` (the calibration pipeline's), so inference keeps torch's numerics. GPTQ's
column loop does not: its many small torch operations between products wait for the cores while the other
library's idle threads still spin, which costs more than the faster products save.

The library is the `scipy-openblas32` wheel (OpenBLAS as numpy and SciPy ship it), called through ctypes. Which
BLAS runs is fixed per machine, not measured, so that every process on it computes the same bits:
`HF_PTQ_CPU_BLAS=openblas` or `torch` if set, else OpenBLAS on AMD CPUs (MKL's handicap there) and torch's
MKL on the others (`benchmarks/cpu_blas.py` compares both). Anything OpenBLAS cannot take (not fp32, not on
the CPU, no unit stride along either dimension) goes to torch; so does everything when the wheel is missing."""

import contextlib
import contextvars
import ctypes
import functools
import logging
import os
from pathlib import Path
from typing import Iterator, Optional, Tuple

import torch

logger = logging.getLogger(__name__)

ENV = "HF_PTQ_CPU_BLAS"
CHOICES = ("openblas", "torch")
_ROW_MAJOR, _NO_TRANS, _TRANS, _UPPER = 101, 111, 112, 121
_INT, _FLOAT, _POINTER = ctypes.c_int, ctypes.c_float, ctypes.c_void_p
MIN_MULTIPLY_ADDS = 1 << 22  # smaller products go to torch: there the call, not the rate, is the cost
_active = contextvars.ContextVar("hf_ptq_cpu_blas_calibrating", default=False)  # per thread: `calibrating()`


@functools.lru_cache(maxsize=None)
def _library() -> Optional[ctypes.CDLL]:
    """OpenBLAS with its signatures declared, or None without the wheel."""
    try:
        import scipy_openblas32
    except ImportError:
        return None
    name = scipy_openblas32.get_library()
    files = [p for p in Path(scipy_openblas32.get_lib_dir()).glob(f"*{name}*") if p.suffix in (".so", ".dylib", ".dll")]
    try:
        lib = ctypes.CDLL(str(files[0]))
        _declare(lib)
    except (IndexError, OSError, AttributeError) as error:  # no file, not loadable, or other symbol names
        logger.warning("scipy-openblas32's %s library is not usable (%s): fp32 products go through torch", name,
                       error)
        return None
    return lib


def _declare(lib: ctypes.CDLL) -> None:
    lib.scipy_cblas_sgemm.argtypes = [_INT] * 6 + [_FLOAT, _POINTER, _INT, _POINTER, _INT, _FLOAT, _POINTER, _INT]
    lib.scipy_cblas_ssyrk.argtypes = [_INT] * 5 + [_FLOAT, _POINTER, _INT, _FLOAT, _POINTER, _INT]
    int_pointer = ctypes.POINTER(_INT)
    lib.scipy_spotrf_.argtypes = [ctypes.c_char_p, int_pointer, _POINTER, int_pointer, int_pointer]
    lib.scipy_openblas_set_num_threads.argtypes = [_INT]


@functools.lru_cache(maxsize=None)
def backend() -> str:
    """"openblas" or "torch": the BLAS this process's fp32 CPU products use."""
    wanted = os.environ.get(ENV, "").strip().lower()
    if wanted and wanted not in CHOICES:
        raise ValueError(f"{ENV}={wanted!r}: expected one of {CHOICES} (or unset: OpenBLAS on AMD CPUs)")
    if _library() is None:
        if wanted == "openblas":
            raise ValueError(f"{ENV}=openblas, but the scipy-openblas32 package is not installed")
        return "torch"
    return wanted or ("openblas" if _cpu_vendor() == "AuthenticAMD" else "torch")


def _cpu_vendor() -> str:
    return cpuinfo_field("vendor_id")  # "AuthenticAMD", "GenuineIntel"


def cpuinfo_field(name: str) -> str:
    """The first `name : value` of /proc/cpuinfo (e.g. "vendor_id", "model name"), or "" where it does not say."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                key, _, value = line.partition(":")
                if key.strip() == name:
                    return value.strip()
    except OSError:
        pass
    return ""


@contextlib.contextmanager
def calibrating() -> Iterator[None]:
    """Within, this thread's fp32 CPU products go through OpenBLAS where `backend()` chooses it. Outside, through
    torch's: a model's outputs then stay what they were, whatever OpenBLAS's thread count (which changes the order
    of its sums; MKL's does not change with it)."""
    token = _active.set(True)
    try:
        yield
    finally:
        _active.reset(token)


def _openblas() -> Optional[ctypes.CDLL]:
    """The library, its thread count set to torch's, if this thread multiplies with it now; else None."""
    if not _active.get() or backend() != "openblas":
        return None
    lib = _library()
    _set_threads(lib, torch.get_num_threads())
    return lib


@functools.lru_cache(maxsize=1)
def _set_threads(lib: ctypes.CDLL, threads: int) -> None:  # cached: only a change of torch's count calls it
    lib.scipy_openblas_set_num_threads(threads)


def _operand(t: torch.Tensor) -> Optional[Tuple[int, int]]:
    """(transpose flag, leading dimension) describing 2-D t to row-major BLAS, or None if its rows (or columns) are
    not contiguous and apart (an expanded tensor's are not)."""
    rows, columns = t.shape
    if (t.stride(1) == 1 or columns == 1) and (rows == 1 or t.stride(0) >= columns):
        return _NO_TRANS, max(t.stride(0), columns, 1)
    if (t.stride(0) == 1 or rows == 1) and (columns == 1 or t.stride(1) >= rows):  # t^T is row-major
        return _TRANS, max(t.stride(1), rows, 1)
    return None


def _takes(*tensors: torch.Tensor) -> bool:
    return all(t.dtype == torch.float32 and t.device.type == "cpu" and t.dim() == 2 for t in tensors)


def _sgemm(c: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float, beta: float) -> bool:
    """c <- alpha a b + beta c through OpenBLAS; False (nothing done) if a layout does not fit."""
    (m, k), n = a.shape, b.shape[1]
    if m * n * k < max(MIN_MULTIPLY_ADDS, 1) or b.shape[0] != k or c.shape != (m, n):
        return False  # torch then multiplies, or names the mismatch
    if _operand(c) != (_NO_TRANS, max(c.stride(0), n, 1)):
        return False
    a_layout, b_layout = _operand(a), _operand(b)
    if a_layout is None or b_layout is None:
        return False
    _library().scipy_cblas_sgemm(_ROW_MAJOR, a_layout[0], b_layout[0], m, n, k, alpha, a.data_ptr(), a_layout[1],
                                 b.data_ptr(), b_layout[1], beta, c.data_ptr(), max(c.stride(0), n, 1))
    return True


def addmm_(c: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, alpha: float = 1.0, beta: float = 1.0
           ) -> torch.Tensor:
    """c <- beta c + alpha a @ b, in place, and c; with beta 0, c's old values are not read (NaN in it is lost)."""
    # An empty inner dimension goes to torch, which still scales c by beta (BLAS returns at once).
    if not (_takes(c, a, b) and a.shape[1] > 0 and _openblas() is not None and _sgemm(c, a, b, alpha, beta)):
        c.addmm_(a, b, beta=beta, alpha=alpha)
    return c


def mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b for 2-D a and b: a new tensor, through `addmm_` for fp32 on CPU."""
    if not _takes(a, b) or _openblas() is None:
        return a @ b
    return addmm_(torch.empty(a.shape[0], b.shape[1], dtype=torch.float32), a, b, beta=0.0)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """F.linear(x, weight, bias), its product through `addmm_` for fp32 inputs on CPU."""
    if not (_takes(weight) and x.dtype == torch.float32 and x.device.type == "cpu") or _openblas() is None:
        return torch.nn.functional.linear(x, weight, bias)
    rows = x.reshape(-1, x.shape[-1])
    out = torch.empty(rows.shape[0], weight.shape[0], dtype=torch.float32)
    addmm_(out, rows, weight.t(), beta=0.0)
    if bias is not None:
        out += bias
    return out.view(*x.shape[:-1], weight.shape[0])


def add_upper_gram_(gram: torch.Tensor, x: torch.Tensor) -> bool:
    """gram += x^T x on and above the diagonal (BLAS's syrk), in place; False (nothing done) when this thread
    does not multiply with OpenBLAS now (`calibrating()`) or the tensors do not fit it."""
    k = x.shape[1]
    fits = _takes(gram, x) and gram.shape == (k, k) and x.shape[0] * k * k >= 2 * MIN_MULTIPLY_ADDS
    if not fits or _operand(gram) != (_NO_TRANS, gram.stride(0)) or _operand(x) != (_NO_TRANS, max(x.stride(0), k)):
        return False
    lib = _openblas()
    if lib is None:
        return False
    lib.scipy_cblas_ssyrk(_ROW_MAJOR, _UPPER, _TRANS, k, x.shape[0], 1.0, x.data_ptr(), max(x.stride(0), k), 1.0,
                          gram.data_ptr(), gram.stride(0))
    return True


def cholesky_lower_(m: torch.Tensor) -> Optional[int]:
    """m <- L (m = L L^T) on and below the diagonal, in place, through LAPACK's potrf; the upper triangle is left
    as it was. Returns LAPACK's info (0, or the order of the first leading minor that is not positive), or
    None (nothing done) when this thread does not factor with OpenBLAS now or m is not a contiguous fp32 matrix."""
    if not _takes(m) or not m.is_contiguous() or m.shape[0] != m.shape[1] or m.shape[0] ** 3 < 3 * MIN_MULTIPLY_ADDS:
        return None
    lib = _openblas()
    if lib is None:
        return None
    # Row-major m is column-major m^T: its upper factor U (U^T U = m, symmetric) is the lower factor L = U^T here.
    n, info = _INT(m.shape[0]), _INT(0)
    lib.scipy_spotrf_(b"U", ctypes.byref(n), m.data_ptr(), ctypes.byref(n), ctypes.byref(info))
    return info.value
