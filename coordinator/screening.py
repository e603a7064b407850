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

import bisect
import math
import statistics
from typing import Dict, List, Mapping, Optional, Tuple

import torch

from coordinator.blockwise import Scratch, squared_distance
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
    scratch = Scratch(2)
    total = 0.0
    for name, tensor in state.items():
        if tensor.is_floating_point():
            total += squared_distance(tensor, base[name], scratch)
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
            notes[name] = _clip_note(norm, median, len(norms), max_ratio)
    return averaged, notes


def _clip_note(norm: float, median: float, count: int, max_ratio: float) -> str:
    return (f"delta norm {norm:.4g} is {norm / median if median else math.inf:.1f}x the median "
            f"{median:.4g} of the round's {count} updates (over {max_ratio:g}x, --max-norm-ratio); "
            "scaled down to the median")


class LoudHold:
    """clip_to_bound for a round whose updates are folded into the new model as they
    arrive (a streaming strategy), so the round's median norm is known only once the
    last has arrived. An update is folded at once when it can no longer be over the
    bound whatever comes next: its norm is within `max_ratio` times a lower bound of the
    round's median (the norms seen so far, the updates still awaited counted as 0).
    Otherwise it is held, up to `capacity` of them; past that the quietest held one is
    folded unscaled, a bet checked at the end (`finish`). An honest round bets right: a
    loud update is the exception, and the quietest of those held is folded. Held ones
    are scaled as clip_to_bound scales them, so the outcome is clip_to_bound's unless
    more than `capacity` updates of one round are over the bound; then `finish` names
    the lost bets and the driver runs the round again holding every update.

    Why not a bound from the norms seen so far, or the previous round's median: either
    changes which updates are scaled (by arrival order, or by how fast norms shrink),
    and the rule's outcome is pinned (tests/unit/test_screening.py,
    tests/integration/test_poisoning.py)."""

    def __init__(self, base: StateDict, max_ratio: float, expected: int, capacity: int) -> None:
        self.base, self.max_ratio, self.expected, self.capacity = base, max_ratio, expected, max(capacity, 1)
        self.norms: Dict[str, float] = {}
        self._sorted: List[float] = []
        self.held: Dict[str, StateDict] = {}
        # Folded unscaled without proof that they are within the bound: checked at the end.
        self._bets: Dict[str, float] = {}

    def _lower_median(self) -> float:
        """The smallest the round's median can still be: more updates may come (up to
        `expected`), each with a norm of 0 at the least, and adding a 0 never raises a
        median (statistics.median of the norms seen and the zeros, without the list)."""
        missing = max(self.expected - len(self._sorted), 0)
        count = missing + len(self._sorted)

        def at(i: int) -> float:
            return 0.0 if i < missing else self._sorted[i - missing]

        if not count:
            return 0.0
        return at(count // 2) if count % 2 else (at(count // 2 - 1) + at(count // 2)) / 2

    def _safe(self, norm: float) -> bool:
        """Within the bound whatever the round's median turns out to be; with fewer than
        three updates possible the rule never fires."""
        return self.expected < MIN_UPDATES_FOR_NORM_RULE or norm <= self.max_ratio * self._lower_median()

    def offer(self, name: str, state: StateDict, norm: float) -> List[Tuple[str, StateDict]]:
        """Take one update's state and norm; returns those to fold now, unscaled (this one,
        held ones the new norm proved safe, or the quietest when the hold is full)."""
        self.norms[name] = norm
        bisect.insort(self._sorted, norm)
        self.held[name] = state
        ready = [(n, self.held.pop(n)) for n in [n for n in self.held if self._safe(self.norms[n])]]
        while len(self.held) > self.capacity:
            quietest = min(self.held, key=lambda n: (self.norms[n], n))
            self._bets[quietest] = self.norms[quietest]
            ready.append((quietest, self.held.pop(quietest)))
        return ready

    def finish(self) -> Tuple[List[Tuple[str, StateDict]], Dict[str, str], List[str]]:
        """Once every update has been offered: the held states to fold (each scaled as
        clip_to_bound would), a note for each one scaled, and the updates folded unscaled
        that the round's median puts over the bound (none unless more than `capacity`
        were loud: the round's result is then not clip_to_bound's)."""
        held, self.held = self.held, {}
        if len(self.norms) < MIN_UPDATES_FOR_NORM_RULE:
            return list(held.items()), {}, []
        median = statistics.median(self.norms.values())
        bound = self.max_ratio * median
        folded, notes = [], {}
        for name, state in held.items():
            norm = self.norms[name]
            if norm > bound:
                state = scaled(state, self.base, median / norm)
                notes[name] = _clip_note(norm, median, len(self.norms), self.max_ratio)
            folded.append((name, state))
        return folded, notes, [name for name, norm in self._bets.items() if norm > bound]


def scaled(state: StateDict, base: StateDict, factor: float) -> StateDict:
    """base + factor x (state - base) over floating tensors, in float64; integer buffers
    are kept as sent (FedAvg averages them)."""
    return {
        name: (base[name].to(torch.float64) + factor * (t.to(torch.float64) - base[name].to(torch.float64))).to(t.dtype)
        if t.is_floating_point() else t
        for name, t in state.items()
    }
