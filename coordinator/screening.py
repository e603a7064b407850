"""Updates screened before FedAvg sees them. FedAvg trusts what it averages: one worker
claiming 2^63-1 examples, or sending a change a hundred times everyone else's, owns the
global model. Two checks bound that:

- an impossible example count drops the update (recorded in `failed`);
- a change (delta) whose norm exceeds --max-norm-ratio times the round's median is
  scaled down to the median norm (recorded in `clipped`): it keeps its direction and a
  typical worker's say, no more. Not dropped: an honest worker whose data the global
  model has not learned yet (back after an absence, holding the only examples of some
  labels) sends such a change too, and dropping it kept it out for good (measured: 15x
  the median on its return, 327x fifty rounds later). Not clipped to the bound: a
  hundredfold change cut to 10x the median still wrecked the model (60% -> 10%).

Updates within the bound are averaged exactly as before. What this stops is a loud
poisoner; a subtle one (within the bound, colluding, or training on flipped labels)
needs a robust strategy (median, trimmed mean, Krum)."""

from __future__ import annotations

import math
import statistics
from typing import Dict, Mapping, Optional, Tuple

import torch

from jetfed.codec import StateDict
from jetfed.config import TrainConfig

# With two updates the larger delta norm is at most twice their median, so a median
# multiple above 2 never fires: it cannot tell which of the two is bad.
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


def clip_to_bound(
    states: Mapping[str, StateDict], base: StateDict, norms: Mapping[str, float], max_ratio: float,
    bases: Optional[Mapping[str, StateDict]] = None,
) -> Tuple[Dict[str, StateDict], Dict[str, str]]:
    """The states to average: each change over `max_ratio` times the median norm is
    scaled down to the median norm, keeping its direction but no more say than a
    typical worker's; a note with the figures for each. With fewer than three updates
    nothing is scaled (see MIN_UPDATES_FOR_NORM_RULE). A change is taken from `base`,
    or from the update's own entry in `bases` (an asynchronous update started from an
    older model)."""
    if len(norms) < MIN_UPDATES_FOR_NORM_RULE:
        return dict(states), {}
    median = statistics.median(norms.values())
    averaged, notes = dict(states), {}
    for name, norm in norms.items():
        if norm > max_ratio * median:
            averaged[name] = scaled(states[name], (bases or {}).get(name, base), median / norm)
            notes[name] = (f"delta norm {norm:.4g} is {norm / median if median else math.inf:.1f}x the median "
                           f"{median:.4g} of the round's {len(norms)} updates (over {max_ratio:g}x, "
                           f"--max-norm-ratio); scaled down to the median")
    return averaged, notes


def scaled(state: StateDict, base: StateDict, factor: float) -> StateDict:
    """base + factor x (state - base) over floating tensors, in float64; integer buffers
    are kept as sent (FedAvg averages them)."""
    return {
        name: (base[name].to(torch.float64) + factor * (t.to(torch.float64) - base[name].to(torch.float64))).to(t.dtype)
        if t.is_floating_point() else t
        for name, t in state.items()
    }
