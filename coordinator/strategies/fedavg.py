"""Federated averaging (McMahan et al.): the global model is the weighted mean of the
updates, each weighted by the examples it trained on (or equally)."""

from __future__ import annotations

from typing import Sequence

import torch

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
    for name, first in states[0].items():
        acc = torch.zeros(first.shape, dtype=torch.float64)
        for state, weight in zip(states, weights):
            acc += state[name].to(torch.float64) * (weight / total)
        averaged[name] = acc.round().to(first.dtype) if not first.is_floating_point() else acc.to(first.dtype)
    return averaged
