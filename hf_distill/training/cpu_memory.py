"""Keep freed memory in the process while training on CPU (glibc only).

A training step frees tens of megabytes of activations and gradients and allocates them again in the next step.
glibc's malloc hands large freed regions back to the operating system (it shrinks the heap once the free memory at
its top passes a threshold, and serves large blocks by mmap), so the next step touches fresh pages again: every
4 KiB page is a page fault and a page zeroed by the kernel. On the toolkits benchmark (benchmarks/bench_toolkits.py,
a 2-layer BERT student of a 6-layer teacher, batch 16 x 64 tokens, one thread) this was 8,600 minor page faults per
step and about 5% of the step. Raising glibc's mmap and trim thresholds keeps that memory for reuse, as PyTorch's
caching allocator does on GPUs; the process's peak memory is the same, but what it freed is not returned until it
exits. The same effect without this package: `MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=2147483647`
in the environment, or a preloaded tcmalloc or jemalloc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

from transformers.utils import logging

logger = logging.get_logger(__name__)

_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 1 << 30  # blocks up to 1 GiB come from the heap, where freed memory is reused
TRIM_THRESHOLD = (1 << 31) - 1  # the heap gives memory back only when more than 2 GiB at its top are free

_applied = False


def _glibc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    name = ctypes.util.find_library("c") or "libc.so.6"
    try:
        library = ctypes.CDLL(name)
    except OSError:
        return None
    return library if hasattr(library, "mallopt") else None


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process, once; True when they are set (now or before),
    False where the C library is not glibc (nothing is changed then)."""
    global _applied
    if _applied:
        return True
    library = _glibc()
    if library is None:
        return False
    ok = library.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    ok = library.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1 and ok
    if ok:
        _applied = True
        logger.info(
            "CPU training: glibc keeps freed memory for reuse (mmap threshold 1 GiB, trim threshold 2 GiB); "
            "pass cpu_keep_freed_memory=False to leave the allocator as it was."
        )
    return ok
