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


def test_a_ray_data_actor_keeps_freed_memory_only_with_the_environment(ray_session):
    """A Ray Data actor runs its batches on a thread of its own, where `keep_freed_memory` (called in the
    constructor, as the inference actor once did) does not hold: every large block is mapped afresh. Started with
    `KEEP_FREED_MEMORY_ENV`, as `pipeline.labelling.job` starts the inference actor, the same thread reuses freed
    blocks."""
    import ray

    from model.memory import KEEP_FREED_MEMORY_ENV

    class Rounds:
        def __init__(self, call_keep_freed_memory: bool) -> None:
            from model.memory import keep_freed_memory

            if call_keep_freed_memory:
                assert keep_freed_memory()

        def __call__(self, batch: dict) -> dict:
            import ctypes
            import resource
            import threading

            import numpy as np

            libc = ctypes.CDLL(None)
            libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
            libc.free.argtypes = [ctypes.c_void_p]
            faults = []
            for _ in range(3):
                before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                block = libc.malloc(256 << 20)
                ctypes.memset(block, 1, 256 << 20)
                libc.free(block)
                faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
            batch["faults"] = np.array([faults])
            batch["main_thread"] = np.array([threading.current_thread() is threading.main_thread()])
            return batch

    # Both actors in one dataset: the first as the inference actor once was, the second as `pipeline.labelling.job`
    # starts it.
    rows = (
        ray.data.range(1)
        .map_batches(
            Rounds, fn_constructor_args=(True,), compute=ray.data.ActorPoolStrategy(size=1), batch_size=1, num_cpus=0.5
        )
        .map_batches(
            lambda batch: {"called": batch["faults"], "called_main_thread": batch["main_thread"]},
            batch_size=1,
            num_cpus=0,
        )
        .map_batches(
            Rounds,
            fn_constructor_args=(False,),
            compute=ray.data.ActorPoolStrategy(size=1),
            batch_size=1,
            num_cpus=0.5,
            runtime_env={"env_vars": KEEP_FREED_MEMORY_ENV},
        )
        .take_all()
    )
    (row,) = rows
    assert not row["called_main_thread"] and not row["main_thread"]
    assert all(faults >= PAGES * 0.9 for faults in row["called"])  # mapped afresh each time
    assert all(faults < PAGES * 0.01 for faults in row["faults"][1:])  # reused
