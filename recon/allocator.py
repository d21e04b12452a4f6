r"""How this process's C heap treats freed memory (glibc's ``malloc``, Linux).

By default glibc serves every block above its mmap threshold (128 kB, raised adaptively to at
most 32 MB) with a mapping of its own and unmaps it on ``free``: the next tensor of that size is
mapped afresh and the kernel zero-fills it page by page on first touch. Multi-coil k-space lives
on such tensors (2 chains x 16 coils x 384 x 396 complex64 coil images: 39 MB each), so the
conjugate gradient of the data-consistency step spent most of its time in page faults.
``benchmarks/allocator.py`` measures the multi-coil normal operator ``A^H A`` and one
data-consistency prox on a measured 16-coil slice with and without this setting.

``keep_freed_memory()`` sets ``M_MMAP_MAX = 0`` (large blocks come from the heap, whose freed
blocks are reused) and ``M_TRIM_THRESHOLD = 2 GiB`` (the heap's free top goes back to the
kernel only beyond that). Allocations of more than a thread arena's 64 MB in a worker thread are
still mapped. The process's resident memory then stays near its peak between slices instead
of falling and faulting back in. A no-op (``False``) where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys

__all__ = ["keep_freed_memory"]

M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
TRIM_THRESHOLD = 2**31 - 1
"""Bytes of free heap top kept before any is returned (``mallopt`` takes a C int)."""


@functools.cache
def keep_freed_memory() -> bool:
    """Keep freed memory for reuse (module docstring); ``True`` where glibc took both settings.
    Process-wide and idempotent."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
