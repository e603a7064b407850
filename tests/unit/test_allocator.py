"""jetfed.allocator: one malloc arena for the threads a service starts after it asks,
and (keep_freed_heap) memory a thread frees reused by its next allocation of the same
size instead of going back to the kernel and faulting in again (the evaluator's
batches); a MALLOC_ARENA_MAX or threshold from the environment left to glibc. Each case
runs in a fresh interpreter (no torch), since the settings are the process's and
pytest's own threads have arenas already."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from jetfed import allocator

ROOT = Path(__file__).resolve().parents[2]
THREADS = 4

# Threads that each allocate while the others hold what they allocated: with glibc's
# default, every new thread's first malloc makes an arena of its own.
ARENAS_SCRIPT = f"""
import os, sys, threading
from jetfed import allocator
limited = allocator.limit_arenas() if sys.argv[1] == "limit" else None
ready, done, kept = threading.Barrier({THREADS + 1}), threading.Event(), []
def allocate():
    kept.append(bytearray(1 << 16))
    ready.wait()
    done.wait()
threads = [threading.Thread(target=allocate) for _ in range({THREADS})]
for thread in threads:
    thread.start()
ready.wait()
print(limited, allocator.extra_arenas(os.getpid()))
done.set()
"""

# A thread allocates and writes three 24 MB blocks (mnist-cnn's activations for a batch
# of 500: the first convolution's output, its ReLU's, ...) and frees them, ten times,
# as the evaluator's torch thread does batch after batch; minor faults counted.
HEAP_SCRIPT = """
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

glibc_only = pytest.mark.skipif(allocator._glibc() is None, reason="malloc arenas and thresholds are glibc's")
PAGES = (24 << 20) // os.sysconf("SC_PAGE_SIZE")  # a block's
BLOCKS = 3


def run(script: str, mode: str, **env: str) -> tuple:
    """`script`'s two printed values, run in `mode` with none of glibc's malloc variables
    set but those in `env`."""
    environment = {k: v for k, v in os.environ.items() if k not in (allocator.ARENA_ENV, *allocator.HEAP_ENVS)}
    environment.update(env)
    out = subprocess.run([sys.executable, "-c", script, mode], cwd=ROOT, env=environment, capture_output=True,
                         text=True, timeout=60, check=True).stdout.split()
    return out[0], int(out[1])


@glibc_only
def test_threads_share_the_main_arena_once_limited():
    assert run(ARENAS_SCRIPT, "limit") == ("True", 0)


@glibc_only
def test_without_the_limit_each_thread_gets_an_arena():
    """What the limit prevents (and proof that extra_arenas sees arenas at all)."""
    assert run(ARENAS_SCRIPT, "default") == ("None", THREADS)


@glibc_only
def test_a_users_malloc_arena_max_wins():
    assert run(ARENAS_SCRIPT, "limit", **{allocator.ARENA_ENV: "3"}) == ("False", 2)


@glibc_only
def test_freed_batches_are_reused_not_faulted_in_again():
    kept, faults = run(HEAP_SCRIPT, "keep")
    _, default_faults = run(HEAP_SCRIPT, "default")
    assert kept == "True"
    assert default_faults > 3 * BLOCKS * PAGES  # glibc's default: pages go back and fault in again
    assert faults < (BLOCKS + 1) * PAGES  # kept: each block's pages faulted in once, then reused


@glibc_only
def test_a_users_threshold_wins():
    kept, faults = run(HEAP_SCRIPT, "keep", MALLOC_TRIM_THRESHOLD_="131072")
    assert kept == "False"
