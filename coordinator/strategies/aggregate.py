"""Aggregators: how the round's deltas (trained - global, one per update, float64) and
their weights become one delta. `mean` is FedAvg's; the others are robust rules that
bound what f hostile workers can do, each at a price in workers (`workers_needed`) and
in accuracy when nobody attacks. They see only floating tensors: integer buffers
(num_batches_tracked) count steps and follow the mean (see base.Composite).

Pure functions of their inputs, except centered clipping, which starts each round from
the previous round's result (state the checkpoint keeps)."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from jetfed.codec import StateDict

Deltas = Sequence[StateDict]


def weighted_mean(deltas: Deltas, weights: Sequence[float]) -> StateDict:
    """Sum of w_i d_i / sum w_i, tensor by tensor, in float64."""
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("the weights of an aggregation must sum to a positive number")
    out: StateDict = {}
    for name in deltas[0]:
        acc = torch.zeros_like(deltas[0][name], dtype=torch.float64)
        for delta, weight in zip(deltas, weights):
            acc += delta[name].to(torch.float64) * (weight / total)
        out[name] = acc
    return out


def _sorted_stack(deltas: Deltas, name: str) -> torch.Tensor:
    return torch.stack([d[name].to(torch.float64) for d in deltas]).sort(dim=0).values


def coordinate_median(deltas: Deltas) -> StateDict:
    """Each coordinate's median; with an even count, the mean of the two middle values
    (torch.median would take the lower one, biased for two-worker splits)."""
    n = len(deltas)
    out: StateDict = {}
    for name in deltas[0]:
        ordered = _sorted_stack(deltas, name)
        out[name] = ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2
    return out


def trimmed_mean(deltas: Deltas, trim: int) -> StateDict:
    """Each coordinate's mean after dropping its `trim` largest and `trim` smallest values."""
    n = len(deltas)
    if n <= 2 * trim:
        raise ValueError(f"a trimmed mean dropping {trim} from each end needs more than {2 * trim} updates, got {n}")
    return {name: _sorted_stack(deltas, name)[trim:n - trim].mean(dim=0) for name in deltas[0]}


def squared_distances(deltas: Deltas) -> torch.Tensor:
    """The n x n matrix of squared L2 distances between the deltas (all tensors as one
    vector), accumulated tensor by tensor so no flat copy of the model is made."""
    n = len(deltas)
    distances = torch.zeros(n, n, dtype=torch.float64)
    for name in deltas[0]:
        flat = torch.stack([d[name].to(torch.float64).reshape(-1) for d in deltas])
        distances += torch.cdist(flat, flat).pow(2) if flat.shape[1] else 0.0
    return distances


def krum_scores(deltas: Deltas, f: int) -> List[float]:
    """Krum's score of each delta (Blanchard et al. 2017): the sum of its squared
    distances to its n - f - 2 nearest neighbours."""
    n = len(deltas)
    neighbours = n - f - 2
    if n < 2 * f + 3:
        raise ValueError(f"krum with f={f} needs at least {2 * f + 3} updates, got {n}")
    distances = squared_distances(deltas)
    scores = []
    for i in range(n):
        others = torch.cat([distances[i, :i], distances[i, i + 1:]]).sort().values
        scores.append(float(others[:neighbours].sum()))
    return scores


def multi_krum_selection(deltas: Deltas, f: int, m: int) -> List[int]:
    """The `m` deltas with the lowest Krum scores (ties to the lower index), in order."""
    scores = krum_scores(deltas, f)
    return sorted(sorted(range(len(deltas)), key=lambda i: (scores[i], i))[:m])


def centered_clip(
    deltas: Deltas, weights: Sequence[float], center: StateDict, tau: float, iterations: int,
) -> Tuple[StateDict, float]:
    """Centered clipping (Karimireddy, He and Jaggi 2021): `iterations` times,
    v <- v + sum_i w_i (d_i - v) min(1, tau / ||d_i - v||) / sum w_i, from v = `center`.
    tau <= 0 takes the median of the distances ||d_i - center|| (a radius that follows
    the updates as the learning rate decays). Returns v and the radius used."""
    total = float(sum(weights))
    v = {name: tensor.to(torch.float64).clone() for name, tensor in center.items()}
    radius = tau
    for _ in range(iterations):
        distances = [_distance(d, v) for d in deltas]
        if radius <= 0:
            radius = sorted(distances)[len(distances) // 2] if len(distances) % 2 else \
                sum(sorted(distances)[len(distances) // 2 - 1:len(distances) // 2 + 1]) / 2
        step = {name: torch.zeros_like(t) for name, t in v.items()}
        for delta, weight, distance in zip(deltas, weights, distances):
            scale = (weight / total) * (min(1.0, radius / distance) if distance > 0 else 1.0)
            for name in step:
                step[name] += (delta[name].to(torch.float64) - v[name]) * scale
        for name in v:
            v[name] += step[name]
    return v, radius


def _distance(a: StateDict, b: StateDict) -> float:
    return math.sqrt(sum(float((a[name].to(torch.float64) - b[name]).pow(2).sum()) for name in b))


class Aggregator(ABC):
    """One rule; `f` is the number of hostile workers it is set to withstand."""

    name = ""
    # Whether the rule is a weighted mean that can take each delta as it arrives and drop
    # it (base.Folding); False: it needs every delta at once (sorting, distances), so
    # the driver holds the round's updates (at most its sample).
    streams = False

    def __init__(self, f: int = 0) -> None:
        self.f = f

    def workers_needed(self) -> int:
        """The fewest updates a round needs for this rule to hold with `f` attackers:
        an honest majority, 2f + 1 (1 for the mean, which withstands none)."""
        return 2 * self.f + 1

    @abstractmethod
    def __call__(self, deltas: Deltas, weights: Sequence[float]) -> StateDict:
        """The round's delta; never mutates its inputs."""

    def note(self) -> Dict[str, object]:
        """What the last call decided (kept in the round's record), e.g. Krum's choice."""
        return {}

    def state_dict(self) -> StateDict:
        return {}

    def load_state_dict(self, tensors: StateDict) -> None:  # noqa: B027  (a no-op default: stateless aggregators keep it)
        """Only centered clipping keeps state (its center)."""


class Mean(Aggregator):
    name = "mean"
    streams = True

    def __call__(self, deltas: Deltas, weights: Sequence[float]) -> StateDict:
        return weighted_mean(deltas, weights)


class Median(Aggregator):
    """Coordinate-wise median (Yin et al. 2018); weights are ignored: a weight is the
    worker's own claim, and a robust rule cannot let a claim buy influence."""

    name = "median"

    def __call__(self, deltas: Deltas, weights: Sequence[float]) -> StateDict:
        return coordinate_median(deltas)


class TrimmedMean(Aggregator):
    """Coordinate-wise mean without the f largest and f smallest values (Yin et al. 2018)."""

    name = "trimmed-mean"

    def __call__(self, deltas: Deltas, weights: Sequence[float]) -> StateDict:
        return trimmed_mean(deltas, self.f)


class Krum(Aggregator):
    """Multi-Krum (Blanchard et al. 2017): the weighted mean of the m deltas closest to
    their neighbours; m = 1 is Krum, m <= 0 takes n - f."""

    def __init__(self, f: int, m: int) -> None:
        super().__init__(f)
        self.m = m
        self.name = "krum" if m == 1 else "multi-krum"
        self._chosen: List[int] = []

    def workers_needed(self) -> int:
        return 2 * self.f + 3

    def __call__(self, deltas: Deltas, weights: Sequence[float]) -> StateDict:
        m = self.m if self.m > 0 else len(deltas) - self.f
        self._chosen = multi_krum_selection(deltas, self.f, max(1, min(m, len(deltas))))
        return weighted_mean([deltas[i] for i in self._chosen], [weights[i] for i in self._chosen])

    def note(self) -> Dict[str, object]:
        return {"chosen": list(self._chosen)}


class CenteredClip(Aggregator):
    """Centered clipping around the previous round's aggregate (its state)."""

    name = "centered-clip"

    def __init__(self, f: int, tau: float, iterations: int) -> None:
        super().__init__(f)
        self.tau = tau
        self.iterations = iterations
        self._center: Optional[StateDict] = None
        self._radius = 0.0

    def __call__(self, deltas: Deltas, weights: Sequence[float]) -> StateDict:
        center = self._center
        if center is None or set(center) != set(deltas[0]):
            center = {name: torch.zeros_like(t, dtype=torch.float64) for name, t in deltas[0].items()}
        # The deltas' order, not the checkpoint's: distances sum over tensors in this
        # order, and a resumed run must add them up as the unbroken one did.
        center = {name: center[name] for name in deltas[0]}
        result, self._radius = centered_clip(deltas, weights, center, self.tau, self.iterations)
        self._center = {name: t.clone() for name, t in result.items()}
        return result

    def note(self) -> Dict[str, object]:
        return {"radius": self._radius}

    def state_dict(self) -> StateDict:
        return {} if self._center is None else {f"center/{k}": v for k, v in self._center.items()}

    def load_state_dict(self, tensors: StateDict) -> None:
        center = {k[len("center/"):]: v.to(torch.float64) for k, v in tensors.items() if k.startswith("center/")}
        self._center = center or None
