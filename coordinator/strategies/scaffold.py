"""SCAFFOLD (Karimireddy et al. 2020, option II): control variates correct each
worker's drift toward its own data. The server keeps c and sends it with the model
(tensors named control/<name>); each worker keeps its own c_i on its disk, trains with
the gradient corrected by c - c_i, and updates c_i from how far it moved. The server
needs no upload of c_i's change: for plain SGD it follows from the update itself,

    delta_c_i = c_i+ - c_i = -c + (x - y_i) / (K_i lr) = -c - delta_y_i / (K_i lr),

with K_i the worker's SGD steps (from the examples it claims and the recipe), so the
upload stays one model. c is the strategy's state, kept in the checkpoint."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any, Dict, Optional, Sequence, Tuple

import torch

from coordinator.strategies.aggregate import Mean
from coordinator.strategies.base import Composite, Contribution
from coordinator.strategies.server_opt import ServerOptimizer
from jetfed.codec import StateDict
from jetfed.config import TrainConfig

CONTROL_PREFIX = "control/"


def sgd_steps(num_examples: int, config: TrainConfig) -> int:
    """The optimizer steps a worker took to train on `num_examples` examples with
    `config` (jetfed.training.train_round: `epochs` passes of equal batches)."""
    per_epoch = num_examples // max(config.epochs, 1)
    return config.epochs * max(1, math.ceil(per_epoch / config.batch_size))


class Scaffold(Composite):
    def __init__(self, name: str, *, optimizer: ServerOptimizer, fleet_size: int, weighting: str = "examples",
                 sample: int = 0, seed: int = 0) -> None:
        super().__init__(name, aggregator=Mean(), optimizer=optimizer, weighting=weighting, sample=sample, seed=seed)
        self.fleet_size = fleet_size
        self.control: Optional[StateDict] = None
        self._recipe: Optional[TrainConfig] = None

    @property
    def workers_keep_state(self) -> bool:
        return True

    @property
    def is_plain_fedavg(self) -> bool:
        return False

    @property
    def streams(self) -> bool:
        """Its control variate's change is taken from every update at the step (batch)."""
        return False

    def configure(self, version: int, config: TrainConfig) -> TrainConfig:
        self._recipe = replace(config, scaffold=True)
        return self._recipe

    def companions(self, global_state: StateDict) -> StateDict:
        """c, sent after the model's tensors (zeros before the first step)."""
        return {f"{CONTROL_PREFIX}{name}": (self.control[name] if self.control is not None and name in self.control
                                            else torch.zeros(t.shape, dtype=torch.float64)).to(t.dtype)
                for name, t in global_state.items() if t.is_floating_point()}

    def aggregate(self, global_state: StateDict, contributions: Sequence[Contribution]) -> StateDict:
        if self._recipe is None:
            raise RuntimeError("scaffold: aggregate before configure (the recipe fixes each worker's steps)")
        new_state = super().aggregate(global_state, contributions)
        floats = sorted(name for name, t in global_state.items() if t.is_floating_point())
        c = self.control or {n: torch.zeros(global_state[n].shape, dtype=torch.float64) for n in floats}
        lr = self._recipe.lr
        change = {n: torch.zeros_like(c[n]) for n in floats}
        for contribution in contributions:
            steps = sgd_steps(contribution.num_examples, self._recipe)
            for n in floats:
                delta_y = contribution.state[n].to(torch.float64) - global_state[n].to(torch.float64)
                change[n] += -c[n] - delta_y / (steps * lr)
        share = len(contributions) / max(self.fleet_size, len(contributions))
        self.control = {n: c[n] + change[n] * (share / len(contributions)) for n in floats}
        return new_state

    def state_dict(self) -> Tuple[StateDict, Dict[str, Any]]:
        tensors, values = super().state_dict()
        if self.control is not None:
            tensors.update({f"{CONTROL_PREFIX}{n}": t for n, t in self.control.items()})
        return tensors, values

    def load_state_dict(self, tensors: StateDict, values: Dict[str, Any]) -> None:
        super().load_state_dict(tensors, values)
        control = {k[len(CONTROL_PREFIX):]: v.to(torch.float64).clone() for k, v in tensors.items()
                   if k.startswith(CONTROL_PREFIX)}
        self.control = control or None
