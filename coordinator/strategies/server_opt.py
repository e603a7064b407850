"""Server optimizers (Reddi et al. 2021, "Adaptive Federated Optimization"): the round's
aggregated delta is a pseudo-gradient, and the server takes a step along it. `Plain`
with lr 1 is FedAvg; `Momentum` is FedAvgM (Hsu et al. 2019); `Adam`, `Yogi` and
`Adagrad` are FedAdam, FedYogi and FedAdagrad, as in the paper: no bias correction,
and tau (the paper's adaptivity) in the denominator.

Moments are kept in float64, one per floating tensor, and are the optimizer's state:
the checkpoint keeps them, so a resumed run takes the same steps as one that never
stopped."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Dict

import torch

from jetfed.codec import StateDict


class ServerOptimizer(ABC):
    name = ""

    def __init__(self, lr: float) -> None:
        self.lr = lr
        self._moments: Dict[str, StateDict] = {}

    @abstractmethod
    def step(self, delta: StateDict) -> StateDict:
        """The change to apply to the global model, from the aggregated delta."""

    def _moment(self, kind: str, like: StateDict) -> StateDict:
        if kind not in self._moments or set(self._moments[kind]) != set(like):
            self._moments[kind] = {n: torch.zeros_like(t, dtype=torch.float64) for n, t in like.items()}
        return self._moments[kind]

    def state_dict(self) -> StateDict:
        return {f"{kind}/{name}": t for kind, moment in sorted(self._moments.items()) for name, t in moment.items()}

    def load_state_dict(self, tensors: StateDict) -> None:
        self._moments = {}
        for key, tensor in tensors.items():
            kind, _, name = key.partition("/")
            self._moments.setdefault(kind, {})[name] = tensor.to(torch.float64).clone()


class Plain(ServerOptimizer):
    """g + lr * delta: FedAvg when lr = 1."""

    name = "plain"

    def step(self, delta: StateDict) -> StateDict:
        return {n: d * self.lr for n, d in delta.items()}


class Momentum(ServerOptimizer):
    """m <- momentum * m + delta; g + lr * m, or with Nesterov's look-ahead
    g + lr * (momentum * m + delta): the step already takes the next round's momentum,
    so the model a round ends with is the one the momentum is heading for."""

    name = "momentum"

    def __init__(self, lr: float, momentum: float, *, nesterov: bool = False) -> None:
        super().__init__(lr)
        self.momentum = momentum
        self.nesterov = nesterov

    def step(self, delta: StateDict) -> StateDict:
        m = self._moment("m", delta)
        for n, d in delta.items():
            m[n].mul_(self.momentum).add_(d)
        if self.nesterov:
            return {n: (m[n] * self.momentum + d) * self.lr for n, d in delta.items()}
        return {n: m[n] * self.lr for n in delta}


class _Adaptive(ServerOptimizer):
    """m <- b1 m + (1 - b1) delta; v by the subclass's rule; g + lr m / (sqrt(v) + tau)."""

    def __init__(self, lr: float, beta1: float, beta2: float, tau: float) -> None:
        super().__init__(lr)
        self.beta1, self.beta2, self.tau = beta1, beta2, tau

    def step(self, delta: StateDict) -> StateDict:
        m, v = self._moment("m", delta), self._moment("v", delta)
        out = {}
        for n, d in delta.items():
            m[n].mul_(self.beta1).add_(d, alpha=1 - self.beta1)
            self._second(v[n], d * d)
            out[n] = self.lr * m[n] / (v[n].sqrt() + self.tau)
        return out

    @abstractmethod
    def _second(self, v: torch.Tensor, squared: torch.Tensor) -> None:
        """Update the second moment in place."""


class Adam(_Adaptive):
    name = "adam"

    def _second(self, v: torch.Tensor, squared: torch.Tensor) -> None:
        v.mul_(self.beta2).add_(squared, alpha=1 - self.beta2)


class Yogi(_Adaptive):
    """v <- v - (1 - b2) d^2 sign(v - d^2): v grows no faster than Adam's, shrinks slower."""

    name = "yogi"

    def _second(self, v: torch.Tensor, squared: torch.Tensor) -> None:
        v.sub_((1 - self.beta2) * squared * torch.sign(v - squared))


class Adagrad(_Adaptive):
    """v <- v + d^2 (beta2 unused)."""

    name = "adagrad"

    def _second(self, v: torch.Tensor, squared: torch.Tensor) -> None:
        v.add_(squared)
