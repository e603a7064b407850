"""jetfed.allocator.keep_freed_heap: with one arena, memory a thread frees is reused by
its next allocation of the same size instead of going back to the kernel and faulting
in again (the evaluator's batches); a threshold from the environment left to glibc.
Each case runs in a fresh interpreter (no torch): the settings are the process's."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from jetfed import allocator

ROOT = Path(__file__).resolve().parents[2]

# A thread allocates and writes three 24 MB blocks (mnist-cnn's activations for a batch
# of 500: the first convolution's output, its ReLU's, ...) and frees them, ten times,
# as the evaluator's torch thread does batch after batch; minor faults counted.
SCRIPT = """
import resource, sys, threading
from jetfed import allocator
kept = allocator.limit_arenas() and allocator.keep_freed_heap() if sys.argv[1] == "keep" else None
faults = []
def batches():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        blocks = [bytes([value]) * (24 << 20) for value in range(3)]
        del blocks
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
thread = threading.Thread(target=batches)
thread.start()
thread.join()
print(kept, faults[0])
"""

glibc_only = pytest.mark.skipif(allocator._glibc() is None, reason="malloc thresholds are glibc's")
PAGES = (24 << 20) // os.sysconf("SC_PAGE_SIZE")  # a block's
BLOCKS = 3


def run(mode: str, **env: str) -> tuple:
    environment = {k: v for k, v in os.environ.items()
                   if k not in (allocator.ARENA_ENV, *allocator.HEAP_ENVS)}
    environment.update(env)
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], cwd=ROOT, env=environment, capture_output=True,
                         text=True, timeout=60, check=True).stdout.split()
    return out[0], int(out[1])


@glibc_only
def test_freed_batches_are_reused_not_faulted_in_again():
    kept, faults = run("keep")
    _, default_faults = run("default")
    assert kept == "True"
    assert default_faults > 3 * BLOCKS * PAGES  # glibc's default: pages go back and fault in again
    assert faults < (BLOCKS + 1) * PAGES  # kept: each block's pages faulted in once, then reused


@glibc_only
def test_a_users_threshold_wins():
    kept, faults = run("keep", MALLOC_TRIM_THRESHOLD_="131072")
    assert kept == "False"
