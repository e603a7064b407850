"""The built-in training loop's optimizers, SGD (with momentum) and Adam, written out.

They step exactly as torch.optim's single-tensor implementations of torch 2.x do
(tests/unit/test_optimizers.py checks them bit for bit against the installed torch),
but never touch torch.optim: from torch 2.0 on, an optimizer's first step imports
torch._dynamo to mark itself as not compilable. That import loads some 900 modules
(sympy and triton among them): 2.6 s and 150 MB of resident memory on a 2-core x86
machine, paid by every worker at start-up for a compiler it never runs, and more on a
Jetson's slower cores and shared memory. Written out, the arithmetic is also the same
on every board from torch 1.13 to 2.x (whose own Adam changed its update in 2.0).

The loop makes a fresh optimizer every round (no state crosses rounds), so these keep
only what one round needs: momentum buffers, Adam's moments and its step count."""

from __future__ import annotations

from typing import Iterable, List, Optional

import torch


class SGD:
    """torch.optim.SGD(params, lr, momentum) without dampening, weight decay or
    Nesterov: `buf = momentum * buf + grad` (the first step's buf is the gradient),
    then `p -= lr * buf`; plain `p -= lr * grad` at momentum 0."""

    def __init__(self, params: Iterable[torch.Tensor], *, lr: float, momentum: float = 0.0) -> None:
        self._params = list(params)
        self._lr = lr
        self._momentum = momentum
        self._buffers: List[Optional[torch.Tensor]] = [None] * len(self._params)

    def zero_grad(self) -> None:
        """Gradients back to None, as torch.optim's zero_grad() does by default."""
        for param in self._params:
            param.grad = None

    @torch.no_grad()
    def step(self) -> None:
        for index, param in enumerate(self._params):
            grad = param.grad
            if grad is None:
                continue
            if self._momentum != 0:
                buffer = self._buffers[index]
                if buffer is None:
                    buffer = self._buffers[index] = grad.detach().clone()
                else:
                    buffer.mul_(self._momentum).add_(grad, alpha=1)
                grad = buffer
            param.add_(grad, alpha=-self._lr)


class Adam:
    """torch.optim.Adam(params, lr) with its defaults (betas 0.9 and 0.999, eps 1e-8,
    no weight decay, no amsgrad), in the order of operations of torch 2.x's
    single-tensor step, so the same gradients give the same bits."""

    BETA1 = 0.9
    BETA2 = 0.999
    EPS = 1e-8

    def __init__(self, params: Iterable[torch.Tensor], *, lr: float) -> None:
        self._params = list(params)
        self._lr = lr
        self._moments: List[Optional[torch.Tensor]] = [None] * len(self._params)
        self._squares: List[Optional[torch.Tensor]] = [None] * len(self._params)
        self._steps = [0] * len(self._params)

    def zero_grad(self) -> None:
        for param in self._params:
            param.grad = None

    @torch.no_grad()
    def step(self) -> None:
        beta1, beta2 = self.BETA1, self.BETA2
        for index, param in enumerate(self._params):
            grad = param.grad
            if grad is None:
                continue
            moment, square = self._moments[index], self._squares[index]
            if moment is None or square is None:
                moment = self._moments[index] = torch.zeros_like(param, memory_format=torch.preserve_format)
                square = self._squares[index] = torch.zeros_like(param, memory_format=torch.preserve_format)
            self._steps[index] += 1
            # torch counts steps in a float32 tensor and reads it back as a Python float.
            step = float(self._steps[index])
            moment.lerp_(grad, 1 - beta1)
            square.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            step_size = self._lr / (1 - beta1 ** step)
            denominator = (square.sqrt() / (1 - beta2 ** step) ** 0.5).add_(self.EPS)
            param.addcdiv_(moment, denominator, value=-step_size)
