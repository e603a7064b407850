"""Differential privacy on the worker: record-level DP-SGD (Abadi et al. 2016, "Deep
Learning with Differential Privacy") and the accountant that says what it has spent.

A DP-SGD round (TrainConfig.noise_multiplier > 0) trains this way, step by step:

- Poisson sampling: each of the worker's N examples joins the step's batch on its own
  with probability q = batch_size / N (so batches vary in size, and may be empty);
  that is the sampling the accountant's subsampled-Gaussian analysis assumes. The
  draw, like the noise, comes from randomness the coordinator does not know (see
  `private_generator`): a coordinator that knew the seed could subtract the noise;
- each example's gradient (Opacus's GradSampleModule, per-sample gradients by hooks,
  on torch 1.13 with opacus 1.4 as on torch 2) is clipped to L2 norm C =
  max_grad_norm over all trained parameters together (`clipped_sum`);
- the clipped gradients are summed, Gaussian noise N(0, (sigma C)^2) is added to
  every coordinate (`add_noise`), and the sum is divided by the expected batch size
  q N: the gradient the optimizer steps along.

Terms of the loss that read no example (FedProx's proximal term, SCAFFOLD's
correction) are added to that private gradient unclipped: they depend only on models
the coordinator already has, so they cost no privacy.

The accountant is Opacus's RDP accountant (Mironov 2017; Mironov, Talwar, Zhang 2019
for the sampled Gaussian): a round of K steps adds (sigma, q, K) to the worker's
ledger for the run, and its epsilon at delta is the ledger's. `Ledger` keeps it on the
board's disk per run (worker --state-dir, as SCAFFOLD's c_i), written before the
round's result leaves, so a restart does not forget what has been spent, and a round
that would take it over the configured budget is refused before it trains.

What it protects: any one training example's influence on everything the worker
sends in the run, to (epsilon, delta). Not what the run leaks about a worker's data
as a whole (user-level; see coordinator/strategies/central_dp.py), and every run
spends its own budget: a board that joins many runs over the same data spends more.

opacus is optional (requirements/privacy.txt): imported on first use, and a worker
without it refuses DP rounds (FAILED_PRECONDITION naming what to install)."""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import math
import secrets
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import grpc
import torch
from torch import nn

from jetfed.config import TrainConfig
from jetfed.durable import write_atomically
from jetfed.errors import JetfedError, WorkerStateError
from jetfed.status import echo

log = logging.getLogger(__name__)
# Opacus's hooks on a model's first layer, whose input needs no gradient: said once per
# step by torch, and harmless (the per-example gradients need the layer's output only).
warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed with respect to "
                        "module outputs since no inputs require gradients")

INSTALL = "pip install 'opacus>=1.4' (JetPack 5, torch 1.13: pip install 'opacus==1.4.*')"
STATE_DIR_SETTING = "--state-dir"
_KIND = "jetfed DP-SGD privacy ledger"


class PrivacyUnavailable(JetfedError):
    """A DP round asked of a worker without the library that computes per-example
    gradients and the accountant."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class PrivacyBudgetExhausted(JetfedError):
    """A DP round that would take this worker's epsilon for the run over its budget.
    RESOURCE_EXHAUSTED on the wire, its details beginning with MARKER, so a coordinator
    tells it from the other refusals (a payload too large) without a status of its own."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    MARKER = "privacy budget"


def _opacus() -> Any:
    try:
        import opacus  # noqa: F401
        from opacus import GradSampleModule  # noqa: F401
        from opacus.accountants import RDPAccountant  # noqa: F401
    except ImportError as exc:
        raise PrivacyUnavailable(f"config.noise_multiplier: DP-SGD needs opacus on this worker ({exc}); {INSTALL}") \
            from None
    return opacus


def require_library() -> None:
    """Refuse now, with what to install, rather than after the weights arrived."""
    _opacus()


# The arithmetic, on plain tensors (unit-tested without a model).


def clipped_sum(per_example: Sequence[torch.Tensor], max_norm: float) -> List[torch.Tensor]:
    """Each example's gradient (dimension 0 of every tensor indexes the batch) scaled
    to L2 norm at most `max_norm`, its norm taken over all the tensors together, then
    summed over the batch: one tensor per parameter. An example already within the
    bound is left as it is."""
    if not per_example or per_example[0].shape[0] == 0:
        return [torch.zeros(g.shape[1:], dtype=g.dtype, device=g.device) for g in per_example]
    # Norms by reduction (no squared copy of B x the model), summed in float64.
    squares = torch.stack([torch.linalg.vector_norm(g.reshape(g.shape[0], -1), dim=1).double().pow(2)
                           for g in per_example]).sum(dim=0)
    factor = (max_norm / (squares.sqrt() + 1e-12)).clamp(max=1.0)
    return [(factor.to(g.dtype) @ g.reshape(g.shape[0], -1)).reshape(g.shape[1:]) for g in per_example]


def add_noise(summed: Sequence[torch.Tensor], noise_multiplier: float, max_norm: float,
              generator: torch.Generator) -> List[torch.Tensor]:
    """`summed` plus Gaussian noise of standard deviation noise_multiplier x max_norm on
    every coordinate, drawn from `generator` (on the CPU, then moved: the same draw
    whatever the device)."""
    std = noise_multiplier * max_norm
    return [g + torch.normal(0.0, std, size=g.shape, generator=generator, dtype=torch.float32).to(g.device, g.dtype)
            for g in summed]


def sample_rate(config: TrainConfig, dataset_size: int) -> float:
    """q: the chance each example joins a step's batch."""
    return min(1.0, config.batch_size / max(dataset_size, 1))


def steps_per_round(config: TrainConfig, dataset_size: int) -> int:
    """The steps a round takes, as the plain loop counts batches: max_batches per epoch,
    or one pass's worth (ceil(N / batch_size)) when it is 0."""
    per_epoch = math.ceil(dataset_size / config.batch_size)
    if config.max_batches:
        per_epoch = min(per_epoch, config.max_batches)
    return per_epoch * config.epochs


def poisson_batches(dataset_size: int, rate: float, steps: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """`steps` index tensors, each example in each with probability `rate`."""
    for _ in range(steps):
        yield (torch.rand(dataset_size, generator=generator) < rate).nonzero().flatten()


def private_generator(seed: Optional[int]) -> torch.Generator:
    """The generator of a round's sampling and noise: from the operating system's
    entropy on a board (`seed` None), so nobody else can replay it; seeded only in
    simulation, where the coordinator holds the data anyway and runs must replay."""
    return torch.Generator().manual_seed(secrets.randbits(63) if seed is None else seed)


def private_seed(seed: int) -> int:
    """A simulation's seed for the private generator, apart from the shuffling seed."""
    return int.from_bytes(hashlib.sha256(f"dp/{seed}".encode()).digest()[:8], "little") & (2**63 - 1)


class PrivateGradients:
    """DP-SGD's gradient for one model: forward through it with `forward`, backward the
    task's (mean-reduced) loss, then `privatize` replaces every trained parameter's
    .grad with the clipped, noised mean over the expected batch size. `close` removes
    the hooks, leaving the model as it was.

    A model whose trained layers are all Linear (on (B, features) inputs) and Conv2d
    (groups 1) takes the book-keeping path (`_BookKeeping`, as in Bu et al. 2022):
    each layer's input and output gradient are kept, a Linear layer's per-example norms
    come from them without ever forming its B per-example gradients, and its clipped
    sum is one matmul. mnist-cnn is such a model (fc1's 400,000 weights a copy per
    example were most of a step). Any other model takes Opacus's per-sample gradients."""

    def __init__(self, model: nn.Module, config: TrainConfig, dataset_size: int, generator: torch.Generator,
                 *, book_keeping: bool = True) -> None:
        _opacus()
        self._params = [p for p in model.parameters() if p.requires_grad]
        self._config = config
        self._expected = sample_rate(config, dataset_size) * dataset_size
        self._generator = generator
        self._book: Optional[_BookKeeping] = _BookKeeping.of(model) if book_keeping else None
        self._module: nn.Module = model
        if self._book is None:
            from opacus import GradSampleModule

            self._module = GradSampleModule(model, batch_first=True, loss_reduction="mean")

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self._module(inputs)

    def privatize(self, examples: int) -> None:
        """The step's gradient from the per-example ones the backward pass left (none
        when the Poisson sample was empty: then the noise alone)."""
        config = self._config
        if not examples:
            summed = [torch.zeros_like(p) for p in self._params]
        elif self._book is not None:
            summed = self._book.clipped_sum(self._params, config.max_grad_norm)
        else:
            summed = clipped_sum([p.grad_sample for p in self._params], config.max_grad_norm)  # type: ignore[attr-defined]  # Opacus's
        noisy = add_noise(summed, config.noise_multiplier, config.max_grad_norm, self._generator)
        for p, g in zip(self._params, noisy):
            p.grad = (g / self._expected).to(p.dtype)
            if self._book is None:
                p.grad_sample = None  # type: ignore[attr-defined]  # Opacus's per-sample gradients

    def close(self) -> None:
        if self._book is not None:
            self._book.close()
        else:
            self._module._close()  # type: ignore[operator]


class _BookKeeping:
    """Each trained layer's input and output gradient, kept by hooks, and from them the
    per-example clipped sum of every parameter's gradient (see PrivateGradients). The
    task's loss is a mean over the batch: the gradients that reach a layer are 1/B of
    each example's, so they are scaled back by B."""

    def __init__(self, layers: List[nn.Module]) -> None:
        self._layers = layers
        self._inputs: Dict[nn.Module, torch.Tensor] = {}
        self._grads: Dict[nn.Module, torch.Tensor] = {}
        self._handles = []
        for layer in layers:
            self._handles.append(layer.register_forward_hook(self._keep_input))
            self._handles.append(layer.register_full_backward_hook(self._keep_grad))

    @classmethod
    def of(cls, model: nn.Module) -> Optional["_BookKeeping"]:
        """The book-keeping of `model`, or None when a trained layer is of another kind."""
        layers = [m for m in model.modules() if any(p.requires_grad for p in m.parameters(recurse=False))]
        for layer in layers:
            if isinstance(layer, nn.Conv2d) and layer.groups == 1 and isinstance(layer.padding, tuple):
                continue
            if isinstance(layer, nn.Linear):
                continue
            return None
        return cls(layers)

    def _keep_input(self, layer: nn.Module, inputs: Tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        self._inputs[layer] = inputs[0].detach()

    def _keep_grad(self, layer: nn.Module, grad_input: Tuple[Any, ...], grad_output: Tuple[torch.Tensor, ...]) -> None:
        self._grads[layer] = grad_output[0].detach()

    def clipped_sum(self, params: List[nn.Parameter], max_norm: float) -> List[torch.Tensor]:
        """One tensor per parameter of `params` (in order): the sum over the batch of
        each example's gradient scaled to L2 norm at most `max_norm`."""
        parts: Dict[int, Any] = {}
        squares: Optional[torch.Tensor] = None
        for layer in self._layers:
            x, g = self._inputs.pop(layer), self._grads.pop(layer)
            g = g * g.shape[0]
            if isinstance(layer, nn.Linear) and x.dim() == 2:
                norms = x.pow(2).sum(1).double() * g.pow(2).sum(1).double()
                parts[id(layer.weight)] = ("linear", x, g)
                if layer.bias is not None:
                    norms = norms + g.pow(2).sum(1).double()
                    parts[id(layer.bias)] = ("bias", g)
            else:
                per_example = self._per_example(layer, x, g)
                norms = torch.zeros(g.shape[0], dtype=torch.float64, device=g.device)
                for param, grad in per_example:
                    norms = norms + torch.linalg.vector_norm(grad.reshape(grad.shape[0], -1), dim=1).double().pow(2)
                    parts[id(param)] = ("dense", grad)
            squares = norms if squares is None else squares + norms
        assert squares is not None
        factor = (max_norm / (squares.sqrt() + 1e-12)).clamp(max=1.0)
        out = []
        for param in params:
            part = parts[id(param)]
            c = factor.to(param.dtype)
            if part[0] == "linear":
                out.append((part[2] * c[:, None]).t() @ part[1])
            elif part[0] == "bias":
                out.append(c @ part[1])
            else:
                out.append((c @ part[1].reshape(part[1].shape[0], -1)).reshape(param.shape))
        return out

    @staticmethod
    def _per_example(layer: nn.Module, x: torch.Tensor, g: torch.Tensor) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """Each example's gradient of the layer's parameters, formed: a convolution's
        (small beside a linear layer's) by unfolding its input, or a Linear layer's on
        inputs with more than two dimensions."""
        batch = g.shape[0]
        if isinstance(layer, nn.Conv2d):
            assert isinstance(layer.padding, tuple)  # `of` keeps only convolutions with numeric padding
            cols = torch.nn.functional.unfold(x, layer.kernel_size, layer.dilation, layer.padding, layer.stride)
            grads = g.reshape(batch, g.shape[1], -1)
            out = [(layer.weight, torch.einsum("bol,bil->boi", grads, cols).reshape(batch, *layer.weight.shape))]
            if layer.bias is not None:
                out.append((layer.bias, grads.sum(2)))
            return out
        assert isinstance(layer, nn.Linear)
        xs, gs = x.reshape(batch, -1, x.shape[-1]), g.reshape(batch, -1, g.shape[-1])
        out = [(layer.weight, torch.einsum("bto,bti->boi", gs, xs))]
        if layer.bias is not None:
            out.append((layer.bias, gs.sum(1)))
        return out

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._inputs.clear()
        self._grads.clear()


# The accountant.


@dataclass(frozen=True)
class Spend:
    """One round's part of the ledger: `steps` steps of the sampled Gaussian mechanism
    with `noise_multiplier` at sampling rate `sample_rate`."""

    round: int
    noise_multiplier: float
    sample_rate: float
    steps: int


def epsilon_of(spends: Iterable[Spend], delta: float) -> float:
    """The epsilon at `delta` that the RDP accountant gives for all of `spends`
    composed; 0 when there are none."""
    steps: Dict[Tuple[float, float], int] = {}
    for s in spends:  # RDP adds up over steps: equal mechanisms are one entry, whatever the rounds
        steps[(s.noise_multiplier, s.sample_rate)] = steps.get((s.noise_multiplier, s.sample_rate), 0) + s.steps
    history = [(sigma, q, k) for (sigma, q), k in steps.items() if k]
    if not history:
        return 0.0
    _opacus()
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = history
    return float(accountant.get_epsilon(delta))


def round_spend(round_number: int, config: TrainConfig, dataset_size: int) -> Spend:
    return Spend(round_number, config.noise_multiplier, sample_rate(config, dataset_size),
                 steps_per_round(config, dataset_size))


class Ledger:
    """What this worker has spent, per run, in `folder` (created 0700 on first use): one
    JSON file per run (never pickled), written atomically. Every round trained counts,
    a round run again after its coordinator resumed included: its first result may
    have left already. A file of another run is left alone (the budget is per run)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def _path(self, run_id: str) -> Path:
        return self.folder / f"privacy-{hashlib.sha256(run_id.encode('utf-8')).hexdigest()[:16]}.json"

    def spends(self, run_id: str) -> List[Spend]:
        path = self._path(run_id)
        if not path.is_file():
            return []
        fix = f"it records the privacy this worker has spent for run {echo(run_id)!r}; restore it, or delete it " \
              "only if no result of that run left this board"
        try:
            data = json.loads(path.read_text())
            if data.get("kind") != _KIND or data.get("run_id") != run_id:
                raise ValueError(f"it says kind {echo(str(data.get('kind')))!r}, run {echo(str(data.get('run_id')))!r}")
            spends = [Spend(int(s["round"]), float(s["noise_multiplier"]), float(s["sample_rate"]), int(s["steps"]))
                      for s in data["spends"]]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise WorkerStateError(f"{STATE_DIR_SETTING}: {path} cannot be read as a privacy ledger ({exc}); {fix}") \
                from None
        for spend in spends:
            if not (math.isfinite(spend.noise_multiplier) and spend.noise_multiplier > 0
                    and 0 < spend.sample_rate <= 1 and spend.steps >= 0):
                raise WorkerStateError(f"{STATE_DIR_SETTING}: {path} holds an impossible entry {spend}; {fix}")
        return spends

    def epsilon(self, run_id: str, delta: float) -> float:
        return epsilon_of(self.spends(run_id), delta)

    def check_budget(self, run_id: str, spend: Spend, config: TrainConfig) -> float:
        """The epsilon after `spend`; refuse (PrivacyBudgetExhausted) when it is over
        the config's budget, before anything is spent."""
        return within_budget(self.spends(run_id), spend, config, f"run {echo(run_id)!r}")

    def record(self, run_id: str, spend: Spend) -> List[Spend]:
        """Add `spend` to the run's ledger, durably; the ledger as it now stands."""
        spends = [*self.spends(run_id), spend]
        data = {"kind": _KIND, "run_id": run_id,
                "spends": [{"round": s.round, "noise_multiplier": s.noise_multiplier, "sample_rate": s.sample_rate,
                            "steps": s.steps} for s in spends]}
        try:
            self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            write_atomically(self._path(run_id), json.dumps(data, indent=1).encode())
        except OSError as exc:
            raise WorkerStateError(f"{STATE_DIR_SETTING}: cannot keep the privacy ledger in {self.folder}: {exc}; "
                                   f"give {STATE_DIR_SETTING} a folder this user may write") from None
        return spends


def within_budget(spent: Sequence[Spend], spend: Spend, config: TrainConfig, run: str) -> float:
    """The epsilon after `spend` on top of `spent`; PrivacyBudgetExhausted when that is
    over config.epsilon_budget (0: no budget)."""
    after = epsilon_of([*spent, spend], config.dp_delta)
    if config.epsilon_budget and after > config.epsilon_budget:
        before = epsilon_of(spent, config.dp_delta)
        raise PrivacyBudgetExhausted(
            f"{PrivacyBudgetExhausted.MARKER} spent: round {spend.round} would take this worker's epsilon for "
            f"{run} from {before:.3f} to {after:.3f} at delta {config.dp_delta:g}, over epsilon_budget "
            f"{config.epsilon_budget:g}; it trains no more rounds of this run")
    return after


def takes_private_seed(task: object) -> bool:
    """Whether `task.train` accepts `private_seed` (a simulation passes it so it replays)."""
    parameters = inspect.signature(task.train).parameters.values()  # type: ignore[attr-defined]
    return any(p.name == "private_seed" or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


def describe(config: TrainConfig) -> str:
    return (f"DP-SGD noise_multiplier={config.noise_multiplier:g} max_grad_norm={config.max_grad_norm:g} "
            f"delta={config.dp_delta:g} epsilon_budget={config.epsilon_budget:g}")


def refused_for_budget(reason: str) -> bool:
    """Whether a failure, as coordinator.failures.describe_failure wrote it, is a
    worker's refusal because its privacy budget for the run is spent."""
    return reason.startswith(f"{PrivacyBudgetExhausted.code.name}: ") and PrivacyBudgetExhausted.MARKER in reason
