"""How much an update that started from an older model counts (asynchronous FL).
Staleness is the number of server steps taken while the update trained: 0 in a
synchronous round. FedBuff (Nguyen et al. 2022) and FedAsync (Xie et al. 2019) use the
polynomial weight (1 + s)^-a, with a = 0.5 by default."""

from __future__ import annotations


def polynomial(staleness: int, exponent: float) -> float:
    """(1 + staleness)^-exponent: 1 for a fresh update, 1/sqrt(1 + s) for exponent 0.5."""
    if staleness < 0:
        raise ValueError(f"staleness {staleness} is negative: an update from a model not yet made")
    return float((1.0 + staleness) ** -exponent)
