"""The C allocator of processes that run the model on the CPU."""

from __future__ import annotations

import ctypes
import ctypes.util

_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
_M_MMAP_MAX = -4


def keep_freed_memory() -> bool:
    """Have glibc's malloc serve every block from its heap and keep freed memory for reuse.

    A forward pass allocates and frees tensors of 10 to 300 MB. By default glibc maps each one afresh and
    unmaps it when freed, so every page of every such tensor faults on first touch (the `transformers` model
    spends a third of a ViT-L forward pass on a 2-core CPU so). With this, resident memory stays at its peak.
    Returns False (and changes nothing) where the C library is not glibc.
    """
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
