"""Fresh output buffers on 2 MiB pages, where Linux allows it.

The native quantizers write each code once, into memory nobody has touched: with 4 KiB pages every
page of a new weight is a page fault, the largest cost of the FP8 step after the conversion itself
(one byte per weight, so a fault per 4096 weights). Asking for transparent huge pages on the buffer
(`madvise(MADV_HUGEPAGE)`, which the kernel honours when THP is in "madvise" or "always" mode) makes
that one fault per 2 MiB. Only the buffer's own whole 2 MiB pages are advised, so nothing beyond the
tensor becomes resident. Elsewhere (other systems, THP off, no libc) the buffer is a plain torch.empty.
"""

import ctypes
import ctypes.util
import functools
import sys

import torch

HUGE_PAGE = 2 << 20
MADV_HUGEPAGE = 14  # linux/mman.h


@functools.cache
def _madvise():
    if not sys.platform.startswith("linux"):
        return None
    try:
        madvise = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True).madvise
    except (OSError, AttributeError, TypeError):
        return None
    madvise.argtypes, madvise.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    return madvise


def empty_on_huge_pages(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    """torch.empty(shape, dtype) on the CPU, its whole 2 MiB pages advised as huge pages before any is touched."""
    tensor = torch.empty(*shape, dtype=dtype, device="cpu")
    madvise = _madvise()
    start, end = tensor.data_ptr(), tensor.data_ptr() + tensor.numel() * tensor.element_size()
    first, last = -(-start // HUGE_PAGE) * HUGE_PAGE, end // HUGE_PAGE * HUGE_PAGE  # the whole pages inside
    if madvise is not None and last > first:
        madvise(first, last - first, MADV_HUGEPAGE)  # advice only: a refusal (EINVAL without THP) changes nothing
    return tensor
