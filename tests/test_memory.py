"""`model.memory.keep_freed_memory`: freed blocks are reused, so a second large allocation faults no pages in."""

from __future__ import annotations

import subprocess
import sys

# In a fresh process: allocate, touch and free 256 MiB with the C library's malloc three times, and print the
# minor page faults of each round.
_ROUNDS = """
import ctypes, resource, sys
from model.memory import keep_freed_memory
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
if sys.argv[1] == "keep":
    assert keep_freed_memory()
size = 256 << 20
for _ in range(3):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)
    libc.free(block)
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
PAGES = (256 << 20) // 4096


def _faults(mode: str) -> list[int]:
    out = subprocess.run([sys.executable, "-c", _ROUNDS, mode], capture_output=True, text=True, check=True).stdout
    return [int(line) for line in out.split()]


def test_freed_memory_is_reused_without_page_faults():
    plain, kept = _faults("plain"), _faults("keep")
    assert all(faults >= PAGES * 0.9 for faults in plain)  # glibc maps and unmaps each block: every page faults
    assert kept[0] >= PAGES * 0.9  # the first touch of the heap
    assert all(faults < PAGES * 0.01 for faults in kept[1:])  # then the same pages, kept
