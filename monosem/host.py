"""The host process's memory allocator, tuned for a training step that allocates the same large tensors
every step (a CPU-only run; a GPU run's tensors live in torch's CUDA caching allocator instead).

torch's CPU tensors come from glibc malloc, which serves large allocations (128 kB at first; the bar rises
as such blocks are freed, to 32 MB at most) with a fresh mmap and returns it to the kernel on free: the next
step's tensor of the same size is zeroed and page-faulted in again. On the 2-core VM of the README's
benchmarks that costs ~0.7 ms per MB: ~100 ms per step for the [4096, 16384] pre-activations alone, ~25 ms
for each 32 MB decoder-sized tensor. Two settings remove it:
  THP_MEM_ALLOC_ENABLE=1  torch puts allocations of 2 MB or more in transparent huge pages (512x fewer
                          faults); read once, at torch's first allocation, so `monosem/__init__.py` sets
                          it (unless the environment says otherwise) before anything imports torch.
  mallopt                 M_MMAP_MAX 0 (every allocation from the heap) and M_TRIM_THRESHOLD 2 GiB (freed
                          memory stays with the process): a tensor freed this step is reused next step.
It takes both: with mallopt alone torch's blocks still come back faulted (measured: 8,192 faults per
32 MB block); with huge pages alone each block is still zeroed again (~500 faults); together, none.
Huge pages without it cost more than they save: each fresh block then waits for the kernel to compact
memory into 2 MB pages (the LM's 400 MB logits every step). So `monosem/__init__.py` applies both to every
process that imports monosem (trainers, producers, tests); THP_MEM_ALLOC_ENABLE=0 in the environment
turns both off (the SAE trainer still keeps freed memory). The process keeps its peak memory until it
exits, as a caching allocator does.

    from monosem import host
    host.tune_allocator()          # True when applied (glibc); elsewhere a no-op that returns False
"""
from __future__ import annotations

import ctypes
import os

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc <malloc.h>
TRIM_THRESHOLD = 2**31 - 1            # the largest value mallopt takes (an int)


def huge_pages_requested() -> bool:
    """Whether torch was asked (THP_MEM_ALLOC_ENABLE) to put large allocations in huge pages."""
    return os.environ.get("THP_MEM_ALLOC_ENABLE", "") not in ("", "0")


def tune_allocator() -> bool:
    """Keep freed memory in this process (glibc mallopt); False where there is no glibc."""
    try:  # the process's own symbols (libc among them): find_library would run ldconfig on every import
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to tune
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
