"""The trainer's allocator tuning (monosem.host): a large tensor freed in one step is reused by the next
without the kernel faulting its pages in again.

    pytest tests/test_host.py
"""
import functools
import os
import subprocess
import sys

import pytest

CYCLE = """
import resource, sys
import monosem, torch
from monosem import host
tuned = host.tune_allocator() if sys.argv[1] == "tuned" else False
def step():  # a 32 MB tensor, written, then freed: what every SAE step does with its decoder-sized ones
    t = torch.empty(8192, 1024)
    t.fill_(1.0)
step(); step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
step()
print(int(tuned), resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def page_faults(mode: str, huge_pages: str) -> tuple[bool, int]:
    env = {**os.environ, "THP_MEM_ALLOC_ENABLE": huge_pages, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", CYCLE, mode], env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    return bool(int(out[0])), int(out[1])


def test_freed_memory_is_reused_without_page_faults():
    tuned, faults = page_faults("tuned", "1")  # what the trainer runs with
    if not tuned:
        pytest.skip("no glibc mallopt here")
    _, plain_faults = page_faults("plain", "0")
    assert plain_faults > 4000, plain_faults   # control: 8,192 pages of 4 kB faulted in again every step
    assert faults < 16, faults                 # none (or a few): the freed block is reused as it is


def test_huge_pages_are_on_unless_the_environment_says_otherwise():
    code = "import monosem, os; print(os.environ['THP_MEM_ALLOC_ENABLE'])"
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    assert subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stdout.strip() == "1"
    code = "import monosem; from monosem import host; print(host.huge_pages_requested())"
    env["THP_MEM_ALLOC_ENABLE"] = "0"  # the user's choice stands
    assert subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stdout.strip() == "False"


def test_openmp_spin_is_short_unless_the_environment_says_otherwise():
    """libgomp reads GOMP_SPINCOUNT when torch loads it: `import monosem` first sets it (the producer then
    gets the step's gaps, see monosem/producer.py); a value from the environment stands."""
    code = "import monosem, os; print(os.environ['GOMP_SPINCOUNT'])"
    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
    run = functools.partial(subprocess.run, [sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert run(env=env).stdout.strip() == "10000"
    assert run(env=env | {"GOMP_SPINCOUNT": "300000"}).stdout.strip() == "300000"
