"""jetfed.allocator: one malloc arena for the threads a service starts after it asks,
a MALLOC_ARENA_MAX from the environment left to glibc. Each case runs in a fresh
interpreter (no torch), since the limit is the process's and pytest's own threads
have arenas already."""

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
SCRIPT = f"""
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

glibc_only = pytest.mark.skipif(allocator._glibc() is None, reason="malloc arenas are glibc's")


def run(mode: str, **env: str) -> tuple:
    environment = {k: v for k, v in os.environ.items() if k != allocator.ARENA_ENV}
    environment.update(env)
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], cwd=ROOT, env=environment, capture_output=True,
                         text=True, timeout=60, check=True).stdout.split()
    return out[0], int(out[1])


@glibc_only
def test_threads_share_the_main_arena_once_limited():
    assert run("limit") == ("True", 0)


@glibc_only
def test_without_the_limit_each_thread_gets_an_arena():
    """What the limit prevents (and proof that extra_arenas sees arenas at all)."""
    assert run("default") == ("None", THREADS)


@glibc_only
def test_a_users_malloc_arena_max_wins():
    assert run("limit", **{allocator.ARENA_ENV: "3"}) == ("False", 2)

