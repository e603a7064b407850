"""Federated averaging (McMahan et al.): the global model is the weighted mean of the
updates, each weighted by the examples it trained on (or equally)."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from coordinator.blockwise import Scratch, add_scaled, two_sum_fold
from jetfed.codec import StateDict


def fedavg(states: Sequence[StateDict], weights: Sequence[float]) -> StateDict:
    """Weighted mean, accumulated in float64; integer buffers (BatchNorm's
    num_batches_tracked) are averaged and rounded back to their dtype."""
    if not states or len(states) != len(weights):
        raise ValueError("fedavg needs one weight per state and at least one state")
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("fedavg weights must sum to a positive number")
    averaged: StateDict = {}
    scratch = Scratch(1)
    for name, first in states[0].items():
        acc = torch.zeros(first.shape, dtype=torch.float64)
        for state, weight in zip(states, weights):
            add_scaled(acc, state[name], weight / total, scratch)  # acc += state[name].to(float64) * share
        averaged[name] = acc.round().to(first.dtype) if not first.is_floating_point() else acc.to(first.dtype)
    return averaged


class ExactSum:
    """A running sum of weighted tensors whose value does not depend on the order they
    come in: every addition keeps its rounding error (Knuth's TwoSum) in a second
    float64 tensor, so hi + lo is the exact sum of the products unless one coordinate
    mixes values more than ~2^70 apart, and the mean rounds it once. Streaming aggregation folds updates in as they arrive, in whatever
    order the network delivers them, and must end with the same model every time (a
    simulation is the same run as a real one; a resumed run as an unbroken one). Each
    product w * x is rounded at most once, alike in any order; only the sum needed care.

    Costs two float64 tensors per tensor (4x a float32 model) and four scratch blocks
    (coordinator.blockwise: the passes run in cache, the same bits as whole tensors)."""

    def __init__(self) -> None:
        self._hi: StateDict = {}
        self._lo: StateDict = {}
        self._scratch = Scratch(4)

    def add(self, values: StateDict, weight: float, *, base: Optional[StateDict] = None, scale: float = 1.0) -> None:
        """Fold in `values` (any dtype) times `weight`, or ((values - base) * scale) *
        weight for the tensors `base` names; integer buffers are summed as floats."""
        for name, tensor in values.items():
            origin = None if base is None else base.get(name)
            hi = self._hi.get(name)
            if hi is None:
                term = tensor.to(torch.float64)
                if origin is not None:
                    term = (term - origin.to(torch.float64)) * scale
                self._hi[name] = term * weight
                self._lo[name] = torch.zeros_like(self._hi[name])
                continue
            two_sum_fold(hi, self._lo[name], tensor, weight, self._scratch, base=origin, scale=scale)

    def mean(self, name: str, total: float) -> torch.Tensor:
        """Tensor `name`'s sum rounded once to float64, over `total` (the summed weights);
        its sums are dropped (each is read once), so the model they become is not held twice."""
        hi, lo = self._hi.pop(name), self._lo.pop(name)
        return (hi + lo) / total
