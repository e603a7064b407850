"""Updates screened before FedAvg sees them. FedAvg trusts what it averages: one worker
claiming 2^63-1 examples, or sending a change a hundred times everyone else's, owns the
global model. An update failing a check here is dropped from its round and recorded,
with its figures, in `failed`; the accepted ones are averaged exactly as before.

What this stops is a loud poisoner. A subtle one (within the bound, colluding, or
training on flipped labels) needs a robust strategy (median, trimmed mean, Krum)."""

from __future__ import annotations

import math
import statistics
from typing import Dict, Mapping, Optional

import torch

from jetfed.codec import StateDict
from jetfed.config import TrainConfig

# With two updates the larger delta norm is at most twice their median, so a median
# multiple above 2 never fires and cannot tell which of the two is bad.
MIN_UPDATES_FOR_NORM_RULE = 3


def max_examples(config: TrainConfig, dataset_size: int) -> int:
    """The most examples an honest worker trains on in a round, counted as
    jetfed.training.train_round counts them: `epochs` passes over at most `max_batches`
    batches of `batch_size` from its partition (the whole partition when 0)."""
    per_epoch = dataset_size if not config.max_batches else min(dataset_size, config.max_batches * config.batch_size)
    return config.epochs * per_epoch


def claim_problem(claimed: int, config: TrainConfig, dataset_size: int) -> Optional[str]:
    """Why a claimed example count is impossible, or None. A claim drives the update's
    weight in the average, so an impossible one is dropped, not clamped: a worker that
    lies about its count is not trusted with its weights either."""
    most = max_examples(config, dataset_size)
    if 1 <= claimed <= most:
        return None
    batches = config.max_batches or "all"
    return (f"REJECTED: claims {claimed} training examples, the round allows 1..{most} "
            f"({batches} batches x {config.batch_size} x {config.epochs} epochs over the {dataset_size} examples "
            f"its GetInfo announced)")


def delta_norm(state: StateDict, base: StateDict) -> float:
    """L2 norm of (update - global) over the floating-point tensors, in float64; integer
    buffers (num_batches_tracked) count steps, not a direction, and are left out."""
    total = 0.0
    for name, tensor in state.items():
        if tensor.is_floating_point():
            total += float((tensor.to(torch.float64) - base[name].to(torch.float64)).pow(2).sum())
    return math.sqrt(total)


def norm_outliers(norms: Mapping[str, float], max_ratio: float) -> Dict[str, str]:
    """The updates whose delta norm exceeds `max_ratio` times the median of the round's
    norms, each with the reason and its figures. With fewer than three updates nothing
    is dropped (see MIN_UPDATES_FOR_NORM_RULE); the example-count check still applies."""
    if len(norms) < MIN_UPDATES_FOR_NORM_RULE:
        return {}
    median = statistics.median(norms.values())
    return {
        name: (f"REJECTED: delta norm {norm:.4g} is {norm / median if median else math.inf:.1f}x the median "
               f"{median:.4g} of the round's {len(norms)} updates (limit {max_ratio:g}x, --max-norm-ratio)")
        for name, norm in norms.items() if norm > max_ratio * median
    }
