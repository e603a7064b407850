"""The C heap of a long-lived service process (glibc's malloc), kept small.

glibc gives every new thread that allocates an arena of its own (up to 8 per core),
and an arena keeps the memory freed in it for its own threads' next allocations. A
worker allocates in turns: the event loop's thread while a Train's weights arrive and
its result leaves, the torch thread while it trains (torch's CPU tensors are
malloc'ed), gRPC's threads in between; each turn's freed memory sat in a different
arena, so the process held every turn's high-water mark at once. One arena lets each
turn reuse what the last one freed: mnist-cnn on x86, 40 reference rounds, peak RSS
617 -> 595 MB, the same training time (bench/worker_memory.py). The turns rarely
overlap, and small allocations go through each thread's lock-free cache (tcache).

Only glibc has the knob (on musl or macOS nothing is done), and a MALLOC_ARENA_MAX the
user set in the environment wins: glibc has read it already."""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import sys
from typing import Optional

log = logging.getLogger(__name__)

ARENA_ENV = "MALLOC_ARENA_MAX"
HEAP_ENVS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")
_M_ARENA_MAX = -8  # malloc.h
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_MAX = 32 << 20  # the most glibc accepts on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX)
_HEAP_MAX_SIZE = 64 << 20  # glibc's reservation for each arena but the main one (64-bit)


@functools.lru_cache(maxsize=None)
def _glibc() -> Optional[ctypes.CDLL]:
    """This process's C library if it is glibc, else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    if not all(hasattr(libc, name) for name in ("gnu_get_libc_version", "mallopt")):
        return None  # musl and other C libraries
    return libc


def limit_arenas(count: int = 1) -> bool:
    """At most `count` malloc arenas for the threads that allocate from now on; call it
    before the service starts its threads (gRPC's, the torch executor). True if set."""
    if os.environ.get(ARENA_ENV):
        return False
    libc = _glibc()
    if libc is None:
        return False
    done = bool(libc.mallopt(_M_ARENA_MAX, count))
    log.debug("malloc arenas limited to %d: %s", count, done)
    return done


def keep_freed_heap(trim_threshold: int = 256 << 20) -> bool:
    """Keep the memory one scoring pass frees for the next one instead of handing it back
    to the kernel: allocations up to 32 MiB come from the heap (not a fresh mmap each)
    and the heap is trimmed only past `trim_threshold` bytes free. Call it with
    limit_arenas(1), before the threads start: a thread's own arena is deleted whenever
    it empties, whatever these thresholds say.

    Why: the evaluator scores 10,000 images in batches of 500, and each batch's
    activations (mnist-cnn: two 23 MB tensors) outgrow glibc's adaptive mmap threshold
    or its trim threshold, so every batch's pages went back to the kernel and the next
    batch faulted them in again, zeroed: 215,000 page faults, ~40% of an evaluation's
    CPU time. The process keeps its high-water mark instead (its peak is unchanged).
    A MALLOC_MMAP_THRESHOLD_ or MALLOC_TRIM_THRESHOLD_ the user set wins. True if set."""
    if any(os.environ.get(name) for name in HEAP_ENVS):
        return False
    libc = _glibc()
    if libc is None:
        return False
    done = bool(libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)) and bool(
        libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold))
    log.debug("malloc keeps freed heap up to %d bytes: %s", trim_threshold, done)
    return done


def extra_arenas(pid: int) -> int:
    """How many malloc arenas besides the main one the process `pid` has, read from
    /proc/PID/maps (Linux, 64-bit glibc): each is a 64 MiB-aligned reservation of 64 MiB,
    read-write up to its used size and inaccessible after. For tests and benchmarks."""
    rows = []
    with open(f"/proc/{pid}/maps") as maps:
        for line in maps:
            fields = line.split()
            low, high = (int(value, 16) for value in fields[0].split("-"))
            rows.append((low, high, fields[1], len(fields) > 5))
    count = 0
    for index, (low, high, mode, named) in enumerate(rows):
        if named or mode != "rw-p" or low % _HEAP_MAX_SIZE:
            continue
        if index + 1 < len(rows):
            next_low, next_high, next_mode, next_named = rows[index + 1]
            if next_low == high and next_mode == "---p" and not next_named:
                high = next_high
        count += high - low == _HEAP_MAX_SIZE
    return count
