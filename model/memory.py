"""The C allocator of processes that run the model on the CPU."""

from __future__ import annotations

import ctypes
import ctypes.util

_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
_M_MMAP_MAX = -4

# The same settings for a whole process, given by environment at its start, plus a single arena. A Ray Data actor
# runs its batches on a thread other than the main one, and glibc gives such a thread an arena of its own whose heaps
# hold at most 64 MB: every larger block is mapped afresh and unmapped when freed, whatever `keep_freed_memory` set.
# With one arena every thread allocates from the main heap, which grows as far as it needs.
KEEP_FREED_MEMORY_ENV = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**31 - 1)}


def keep_freed_memory() -> bool:
    """Have glibc's malloc serve every block from its heap and keep freed memory for reuse, in this process.

    A forward pass allocates and frees tensors of 10 to 300 MB. By default glibc maps each one afresh and
    unmaps it when freed, so every page of every such tensor faults on first touch (the `transformers` model
    spends a third of a ViT-L forward pass on a 2-core CPU so). With this, resident memory stays at its peak.
    It holds for the main thread's allocations; for a process whose model runs on another thread, start it with
    `KEEP_FREED_MEMORY_ENV`. Returns False (and changes nothing) where the C library is not glibc.
    """
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
