"""Hostile workers for robustness studies, emulated by the harness (never by a product
flag): in-process workers (coordinator.local_fleet) that train as an honest board would,
then send something else. The simulated fleet trains its workers one at a time in roster
order, so hostile workers placed last see the round's honest updates (the omniscient
attacker of the literature, the strongest case).

- sign-flip: the change reversed and scaled (g - scale * (y - g));
- noise: Gaussian noise of `sigma` per coordinate added to the global model;
- alie: "a little is enough" (Baruch et al. 2019): every hostile worker sends the honest
  changes' mean minus z times their standard deviation, per coordinate, small enough to
  pass norm checks and statistics;
- label-flip: honest training on labels mapped c -> classes - 1 - c.
"""

from __future__ import annotations

from typing import Dict, List

import torch

from coordinator.clients import Update, Weights
from coordinator.local_fleet import LocalWorker
from jetfed.config import TrainConfig
from jetfed.tasks.base import TensorExamples

ATTACKS = ("none", "sign-flip", "noise", "alie", "label-flip")


class RoundBoard:
    """The honest updates of the round in progress, shared by the hostile workers."""

    def __init__(self) -> None:
        self.round = -1
        self.honest: List[Dict[str, torch.Tensor]] = []

    def add(self, round_number: int, state: Dict[str, torch.Tensor]) -> None:
        if round_number != self.round:
            self.round, self.honest = round_number, []
        self.honest.append(state)


class WatchedWorker(LocalWorker):
    """An honest worker whose updates the hostile ones can read."""

    def __init__(self, worker: LocalWorker, board: RoundBoard) -> None:
        super().__init__(worker.name, worker._trainer, worker.data)
        self.board = board

    def _train(self, round_number: int, config: TrainConfig, weights: Weights) -> Update:
        update = super()._train(round_number, config, weights)
        self.board.add(round_number, update.weights.state)
        return update


class HostileWorker(LocalWorker):
    def __init__(self, worker: LocalWorker, attack: str, board: RoundBoard, *, scale: float = 5.0,
                 sigma: float = 0.5, z: float = 1.0, num_classes: int = 10) -> None:
        data = worker.data
        if attack == "label-flip":
            assert isinstance(data, TensorExamples)
            data = TensorExamples(data.inputs, num_classes - 1 - data.targets, data.device)
        super().__init__(worker.name, worker._trainer, data)
        self.attack, self.board, self.scale, self.sigma, self.z = attack, board, scale, sigma, z

    def _train(self, round_number: int, config: TrainConfig, weights: Weights) -> Update:
        update = super()._train(round_number, config, weights)
        if self.attack in ("none", "label-flip"):
            return update
        g, y = weights.state, update.weights.state
        floats = [n for n, t in g.items() if t.is_floating_point()]
        sent = dict(y)
        generator = torch.Generator().manual_seed(round_number * 7919 + sum(map(ord, self.name)))
        for n in floats:
            if self.attack == "sign-flip":
                sent[n] = g[n] - self.scale * (y[n] - g[n])
            elif self.attack == "noise":
                sent[n] = g[n] + torch.randn(g[n].shape, generator=generator) * self.sigma
            elif self.attack == "alie":
                honest = [h for h in self.board.honest if self.board.round == round_number] or [y]
                deltas = torch.stack([h[n] - g[n] for h in honest])
                std = deltas.std(dim=0, unbiased=False) if len(honest) > 1 else torch.zeros_like(g[n])
                sent[n] = g[n] + deltas.mean(dim=0) - self.z * std
        return Update(worker=update.worker, weights=Weights.of(sent, update.weights.manifest.model),
                      num_examples=update.num_examples, mean_loss=update.mean_loss,
                      train_seconds=update.train_seconds, device=update.device)


def corrupt(workers: Dict[str, LocalWorker], attack: str, hostile: int) -> Dict[str, LocalWorker]:
    """The fleet with its last `hostile` workers attacking, the others watched."""
    board = RoundBoard()
    names = list(workers)
    bad = set(names[len(names) - hostile:]) if attack != "none" else set()
    return {name: HostileWorker(w, attack, board) if name in bad else WatchedWorker(w, board)
            for name, w in workers.items()}
