"""Giving freed heap memory back to the OS while quantizing on load (glibc's malloc_trim).

Quantizing a weight allocates temporaries of a few MiB (the row blocks, their scales and packed
codes). glibc serves allocations below its dynamic mmap threshold from the heap and keeps freed
heap pages resident, so after hundreds of weights the process holds 20-50% more than the tensors
alive (measured by benchmarks/load_memory.py). `malloc_trim(0)` returns every free page of every
arena, and is cheap enough to call once per weight. A no-op where glibc is absent.
"""

import ctypes
import ctypes.util
import functools
import logging

logger = logging.getLogger(__name__)


@functools.cache
def _malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc (musl, macOS, Windows): nothing to trim
        return None


def release_freed_heap() -> None:
    """Return the heap's free pages to the OS, if the C library can."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
