"""A worker process's C heap: the threads it starts share glibc's main malloc arena
(jetfed.allocator), so the memory one turn frees (a Train's receive, its training, its
send) is the next turn's; with glibc's default each thread kept its own (8 arenas,
~20 MB more RSS after 40 mnist-cnn rounds on x86)."""

from __future__ import annotations

import pytest

from jetfed import allocator
from tests.integration.processes import Fleet


@pytest.mark.skipif(allocator._glibc() is None, reason="malloc arenas are glibc's")
def test_a_serving_worker_keeps_one_malloc_arena(fleet: Fleet):
    # Serving: gRPC's threads have started and allocated (8 arenas here without the limit).
    extra = {name: allocator.extra_arenas(process.popen.pid) for name, process in fleet.workers.items()}
    assert all(count <= 1 for count in extra.values()), f"malloc arenas besides the main one: {extra}"
