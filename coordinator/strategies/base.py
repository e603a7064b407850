"""The Strategy seam: drivers (synchronous rounds, the asynchronous buffer) hand a
strategy the proven updates of one server step and take back the next global model.
A strategy never sees gRPC, clocks or files, so it is unit-tested on plain tensors.

Strategies are composed, not subclassed: `Composite` = an aggregator (how deltas
become one) + a server optimizer (the step taken along it) + a staleness exponent (how
much an old update counts) + what the workers are told (FedProx's proximal term) + who
is sampled. Deltas (trained - global) are the currency; the one exception is plain
FedAvg (mean, lr 1, no staleness), which averages the states themselves, as jetfed
always has, so its models stay bit-identical to earlier releases' (the delta form
differs in the last float bit for about 0.2% of the parameters)."""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from coordinator.strategies.aggregate import Aggregator, Mean
from coordinator.strategies.fedavg import ExactSum, fedavg
from coordinator.strategies.server_opt import Plain, ServerOptimizer
from coordinator.strategies.staleness import polynomial
from jetfed.codec import StateDict
from jetfed.config import TrainConfig


@dataclass(frozen=True)
class Contribution:
    """One proven update as a strategy sees it: the trained state, the examples it
    claims, the model version it started from and the server steps taken meanwhile.
    `base` is that version's weights when it is not the current global model (an
    asynchronous update): the delta is taken from where the worker started."""

    worker: str
    state: StateDict
    num_examples: int
    base_version: int = 0
    staleness: int = 0
    base: Optional[StateDict] = None
    # How much rarer this worker's updates are than the fleet's average (asynchronous
    # runs with `balance`: its mean time per update over the fleet's); 1 in rounds.
    pace: float = 1.0


class Accumulator(ABC):
    """One server step fed update by update (Strategy.begin): `add` each proven
    contribution as it arrives, then `finish` for the next global model, once."""

    @abstractmethod
    def add(self, contribution: Contribution) -> None:
        """Take one update into the step (a folding accumulator keeps none of its tensors)."""

    @abstractmethod
    def finish(self) -> StateDict:
        """The next global model; the accumulator is spent."""


class Batch(Accumulator):
    """For a strategy that needs every update at once (a median, Krum's distances): holds
    them all, then calls its `aggregate`. The driver bounds how many there are (the
    round's sample)."""

    def __init__(self, strategy: "Strategy", global_state: StateDict) -> None:
        self._strategy, self._global = strategy, global_state
        self._contributions: List[Contribution] = []

    def add(self, contribution: Contribution) -> None:
        self._contributions.append(contribution)

    def finish(self) -> StateDict:
        contributions, self._contributions = self._contributions, []
        return self._strategy.aggregate(self._global, contributions)


class Strategy(ABC):
    name = ""
    # Synchronous strategies run in rounds; asynchronous ones in a buffer of updates.
    asynchronous = False

    @property
    def streams(self) -> bool:
        """Whether `begin` folds each update in as it arrives and drops it (a mean), so a
        step holds O(model) whatever the number of updates; False: it needs every update
        at once (see Batch)."""
        return False

    def begin(self, global_state: StateDict) -> Accumulator:
        """A server step from `global_state`, fed update by update (default: Batch)."""
        return Batch(self, global_state)

    def select(self, version: int, available: Sequence[str]) -> List[str]:
        """Who trains for `version` (default: everyone available, jetfed's behaviour)."""
        return list(available)

    def configure(self, version: int, config: TrainConfig) -> TrainConfig:
        """The recipe sent with `version` (default: unchanged)."""
        return config

    def workers_needed(self) -> int:
        """The fewest updates a step needs for the strategy's guarantees."""
        return 1

    def companions(self, global_state: StateDict) -> StateDict:
        """Tensors sent to the workers after the model's (SCAFFOLD's control variate);
        {} sends the model alone."""
        return {}

    @abstractmethod
    def aggregate(self, global_state: StateDict, contributions: Sequence[Contribution]) -> StateDict:
        """The next global model; never mutates its inputs."""

    @property
    def workers_keep_state(self) -> bool:
        """Whether each worker keeps state from round to round on its disk (SCAFFOLD's
        c_i, of the last rounds only): the synchronous driver then trains a round only
        once the round before is checkpointed, so a resumed run never asks a worker to
        run again a round whose earlier state it has pruned."""
        return False

    def note(self) -> Dict[str, Any]:
        """What the last aggregate decided, for the round's record ({} when nothing)."""
        return {}

    def state_dict(self) -> Tuple[StateDict, Dict[str, Any]]:
        """Tensors (server moments, a clipping center) and JSON values the checkpoint keeps."""
        return {}, {}

    def load_state_dict(self, tensors: StateDict, values: Dict[str, Any]) -> None:  # noqa: B027  (a no-op default: stateless strategies keep it)
        """Put back what state_dict returned, so --resume continues the same run."""


class Composite(Strategy):
    def __init__(
        self, name: str, *, aggregator: Optional[Aggregator] = None, optimizer: Optional[ServerOptimizer] = None,
        weighting: str = "examples", staleness_exponent: float = 0.0, proximal_mu: float = 0.0,
        sample: int = 0, seed: int = 0,
    ) -> None:
        self.name = name
        self.aggregator = aggregator or Mean()
        self.optimizer = optimizer or Plain(1.0)
        self.weighting = weighting
        self.staleness_exponent = staleness_exponent
        self.proximal_mu = proximal_mu
        self.sample = sample
        self.seed = seed

    @property
    def is_plain_fedavg(self) -> bool:
        """The mean with a plain step of 1: FedAvg, averaged in state space when every
        update is whole (see `aggregate`)."""
        return isinstance(self.aggregator, Mean) and isinstance(self.optimizer, Plain) and self.optimizer.lr == 1.0

    @property
    def streams(self) -> bool:
        return self.aggregator.streams

    def begin(self, global_state: StateDict) -> Accumulator:
        return Folding(self, global_state) if self.streams else Batch(self, global_state)

    def select(self, version: int, available: Sequence[str]) -> List[str]:
        """All of `available`, or `sample` of them drawn by (seed, version): the same
        draw on a resumed run, and in simulation as on boards."""
        if not self.sample or self.sample >= len(available):
            return list(available)
        chosen = set(random.Random(f"{self.seed}/{version}").sample(sorted(available), self.sample))
        return [name for name in available if name in chosen]

    def configure(self, version: int, config: TrainConfig) -> TrainConfig:
        return replace(config, proximal_mu=self.proximal_mu) if self.proximal_mu else config

    def workers_needed(self) -> int:
        return self.aggregator.workers_needed()

    def weight(self, contribution: Contribution) -> float:
        """The update's share of the mean: its examples (or 1, --weighting equal)."""
        return float(contribution.num_examples) if self.weighting == "examples" else 1.0

    def discount(self, contribution: Contribution) -> float:
        """How much of its change an update brings (FedBuff: (1 + staleness)^-a, times
        its worker's pace); 1 in synchronous rounds. A factor on the delta, not a share
        of the mean: a buffer of stale updates moves the model less, as in the paper."""
        factor = contribution.pace
        if self.staleness_exponent:
            factor *= polynomial(contribution.staleness, self.staleness_exponent)
        return factor

    def aggregate(self, global_state: StateDict, contributions: Sequence[Contribution]) -> StateDict:
        if not contributions:
            raise ValueError("a server step needs at least one update")
        weights = [self.weight(c) for c in contributions]
        if self.is_plain_fedavg and all(c.base is None and self.discount(c) == 1.0 for c in contributions):
            return fedavg([c.state for c in contributions], weights)
        # Sorted: aggregators sum over tensors in this order (distances, norms), and a
        # model read back from a checkpoint comes in the file's order, not the fleet's.
        floats = sorted(name for name, t in global_state.items() if t.is_floating_point())
        deltas = [{n: (c.state[n].to(torch.float64) - (global_state if c.base is None else c.base)[n].to(torch.float64))
                   * self.discount(c) for n in floats} for c in contributions]
        step = self.optimizer.step(self.aggregator(deltas, weights))
        counters = fedavg([{n: c.state[n] for n in global_state if n not in step} for c in contributions], weights) \
            if len(step) < len(global_state) else {}
        return {
            name: (tensor.to(torch.float64) + step[name]).to(tensor.dtype) if name in step else counters[name]
            for name, tensor in global_state.items()
        }

    def note(self) -> Dict[str, Any]:
        return self.aggregator.note()

    def state_dict(self) -> Tuple[StateDict, Dict[str, Any]]:
        tensors = {f"optimizer/{k}": v for k, v in self.optimizer.state_dict().items()}
        tensors.update({f"aggregator/{k}": v for k, v in self.aggregator.state_dict().items()})
        return tensors, {}

    def load_state_dict(self, tensors: StateDict, values: Dict[str, Any]) -> None:
        self.optimizer.load_state_dict({k[len("optimizer/"):]: v for k, v in tensors.items()
                                        if k.startswith("optimizer/")})
        self.aggregator.load_state_dict({k[len("aggregator/"):]: v for k, v in tensors.items()
                                         if k.startswith("aggregator/")})


class Folding(Accumulator):
    """A mean-type step (Composite with a streaming aggregator) fed one update at a time:
    each weighted update is folded into exact sums (fedavg.ExactSum) and dropped, so
    the step holds two float64 sums of the model whatever the number of updates, and
    ends with the same model in any arrival order.

    Plain FedAvg folds the states (its state-space average), the others the deltas
    (trained - global, times the discount) for the optimizer's step, and the integer
    buffers as FedAvg does. The result is the exact weighted mean rounded once; the
    batch `aggregate` sums in the contributions' order with each weight divided by the
    total first, which differs from it in the last bit of a few coordinates in a
    thousand (measured: 0.02-1.7%, most where the mean of float32 values is an exact tie).
    No order-free sum can reproduce those bits: the total is known only at the end."""

    def __init__(self, strategy: Composite, global_state: StateDict) -> None:
        self._strategy, self._global = strategy, global_state
        self._plain = strategy.is_plain_fedavg
        # Sorted, as Composite.aggregate orders the optimizer's tensors.
        self._floats = sorted(name for name, t in global_state.items() if t.is_floating_point())
        self._sum = ExactSum()
        self._count = 0
        self._total = 0.0

    def add(self, contribution: Contribution) -> None:
        strategy = self._strategy
        weight = strategy.weight(contribution)
        whole = contribution.base is None and strategy.discount(contribution) == 1.0
        if self._plain:
            if not whole:
                raise ValueError("state-space FedAvg folds whole updates of the current model; a stale or "
                                 "discounted one goes through aggregate")
            self._sum.add(contribution.state, weight)
        else:
            base = self._global if contribution.base is None else contribution.base
            discount = strategy.discount(contribution)
            self._sum.add({n: contribution.state[n] for n in self._floats}, weight,
                          base={n: base[n] for n in self._floats}, scale=discount)
            self._sum.add({n: t for n, t in contribution.state.items() if n not in self._floats}, weight)
        self._count += 1
        self._total += weight

    def finish(self) -> StateDict:
        if not self._count:
            raise ValueError("a server step needs at least one update")
        total = self._total
        if total <= 0:
            raise ValueError("the weights of an aggregation must sum to a positive number")
        out: StateDict = {}
        if self._plain:
            for name, tensor in self._global.items():
                mean = self._sum.mean(name, total)
                out[name] = mean.to(tensor.dtype) if tensor.is_floating_point() else mean.round().to(tensor.dtype)
            return out
        step = self._strategy.optimizer.step({n: self._sum.mean(n, total) for n in self._floats})
        for name, tensor in self._global.items():
            if name in step:
                out[name] = (tensor.to(torch.float64) + step.pop(name)).to(tensor.dtype)
            else:
                out[name] = self._sum.mean(name, total).round().to(tensor.dtype)
        return out
