"""SCAFFOLD on the worker (Karimireddy et al. 2020, "SCAFFOLD: Stochastic Controlled
Averaging for Federated Learning", option II of its control update).

Local SGD on a board's skewed data drifts toward that board's own optimum. SCAFFOLD
corrects every local step by c - c_i: c is the server's control variate, its estimate
of the direction the whole fleet's update takes, and c_i this worker's estimate of its
own. Here:

- on the wire, a Train whose config has `scaffold` carries one payload: the model's
  tensors and then c, one tensor `control/<name>` per floating-point tensor of the
  model's state_dict, same dtype and shape (`join_controls`, `split_controls`,
  `train_spec`); the result is the trained model alone, as always;
- each step, `Correction` adds sum((c - c_i) * w) to the batch's loss, so its gradient
  gains c - c_i (jetfed.training.train_round takes it through `controls`);
- after K steps of rate lr from x to y, c_i becomes c_i - c + (x - y) / (K lr)
  (`next_client_control`), computed in float64;
- `ControlStore` keeps c_i on the board's disk per run, versioned by round, so a round
  run again after its coordinator resumed uses what the round before it left, and a
  worker restarted picks up where it was.

Floating buffers (batch-norm statistics) get control tensors like every floating tensor
of the state_dict, and their c_i follows the same update, but no gradient reaches a
buffer, so no correction does either.
"""

from __future__ import annotations

import inspect
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Tuple, cast

import torch
from torch import nn

from jetfed import codec
from jetfed.errors import InvalidConfig
from jetfed.round_files import STATE_DIR_SETTING, RoundFiles
from jetfed.status import echo

log = logging.getLogger(__name__)

CONTROL_PREFIX = "control/"
_KIND = "jetfed scaffold client control variate"

StateDict = Dict[str, torch.Tensor]


def control_names(state: Mapping[str, torch.Tensor]) -> List[str]:
    """The tensors that have a control variate: the floating ones, in state_dict order."""
    return [name for name, tensor in state.items() if tensor.is_floating_point()]


def join_controls(model_state: Mapping[str, torch.Tensor], control: Mapping[str, torch.Tensor]) -> StateDict:
    """A SCAFFOLD Train's tensors: the model's, then `control` as control/<name> in the
    model's state_dict order (a manifest lists them sorted by name all the same)."""
    joined = dict(model_state)
    for name in control_names(model_state):
        joined[CONTROL_PREFIX + name] = control[name]
    return joined


def split_controls(state: Mapping[str, torch.Tensor]) -> Tuple[StateDict, StateDict]:
    """(the model's tensors, the server's c by model tensor name) of a SCAFFOLD Train's
    payload, whose manifest was checked against `train_spec` already."""
    model = {name: t for name, t in state.items() if not name.startswith(CONTROL_PREFIX)}
    control = {name[len(CONTROL_PREFIX):]: t for name, t in state.items() if name.startswith(CONTROL_PREFIX)}
    return model, control


def train_spec(model_state: Mapping[str, torch.Tensor]) -> Tuple[codec.TensorInfo, ...]:
    """The manifest spec a SCAFFOLD Train's weights must have for this model."""
    return codec.spec_of(join_controls(model_state, model_state))


def zero_controls(model_state: Mapping[str, torch.Tensor]) -> StateDict:
    """c_i before a worker's first round of a run: zeros, on the CPU."""
    return {name: torch.zeros_like(model_state[name], device="cpu") for name in control_names(model_state)}


@dataclass(frozen=True)
class ControlVariates:
    """One round's SCAFFOLD state, each a tensor per floating tensor of the model's
    state_dict, keyed by its name: the server's c and this worker's c_i."""

    server: StateDict
    client: StateDict


class Correction:
    """sum over trained parameters of ((c - c_i) * w).sum(): added to a batch's loss, it
    adds c - c_i to each parameter's gradient and leaves the task's gradient as it was
    (a zero c - c_i adds exact zeros). c - c_i is taken once, in float64, then held in
    each parameter's dtype on its device."""

    def __init__(self, model: nn.Module, controls: ControlVariates) -> None:
        self._pairs = [
            (p, (controls.server[name].double() - controls.client[name].double()).to(device=p.device, dtype=p.dtype))
            for name, p in model.named_parameters() if p.requires_grad
        ]

    def __call__(self) -> torch.Tensor:
        return cast(torch.Tensor, sum((drift * p).sum() for p, drift in self._pairs))  # a trained model has parameters


def next_client_control(
    controls: ControlVariates, start: Mapping[str, torch.Tensor], trained: Mapping[str, torch.Tensor], steps: int,
    lr: float,
) -> StateDict:
    """Option II: c_i+ = c_i - c + (x - y) / (K lr), x the model the round started from,
    y the trained one, K the optimizer steps taken, for every control tensor; in float64,
    stored on the CPU in the tensor's dtype. A round that took no step learnt nothing:
    c_i stays."""
    if steps < 1:
        return {name: tensor.clone() for name, tensor in controls.client.items()}
    scale = 1.0 / (steps * lr)
    updated = {}
    for name, client in controls.client.items():
        drift = start[name].detach().to("cpu", torch.float64) - trained[name].detach().to("cpu", torch.float64)
        value = client.double() - controls.server[name].double() + drift * scale
        updated[name] = value.to(client.dtype)
    return updated


def takes_controls(task: object) -> bool:
    """Whether `task.train` accepts `controls`: a custom task whose own loop predates
    SCAFFOLD does not, and its SCAFFOLD rounds train uncorrected."""
    parameters = inspect.signature(task.train).parameters.values()  # type: ignore[attr-defined]
    return any(p.name == "controls" or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


def state_dir(value: Optional[str], worker: str) -> Path:
    """A worker's --state-dir, or ~/.local/state/jetfed/<worker>; checked at start-up
    (an existing folder writable, a missing one creatable) but created on first use."""
    if value is not None:
        folder = Path(value).expanduser()
    else:
        if worker in ("", ".", "..") or "/" in worker or "\0" in worker:
            raise InvalidConfig(f"{STATE_DIR_SETTING}: worker name {echo(worker)!r} cannot name a folder; "
                                f"give {STATE_DIR_SETTING} DIR")
        try:
            folder = Path.home() / ".local" / "state" / "jetfed" / worker
        except (KeyError, RuntimeError) as exc:
            raise InvalidConfig(f"{STATE_DIR_SETTING}: this user has no home folder ({exc}); "
                                f"give {STATE_DIR_SETTING} DIR") from None
    _require_writable(folder)
    return folder


def _require_writable(folder: Path) -> None:
    existing = folder
    try:
        while not existing.exists():
            existing = existing.parent
    except OSError as exc:
        raise InvalidConfig(f"{STATE_DIR_SETTING}: {folder} cannot be checked: {exc}") from None
    fix = f"give {STATE_DIR_SETTING} a folder this user may write"
    if not existing.is_dir():
        raise InvalidConfig(f"{STATE_DIR_SETTING}: {folder} cannot be a folder: {existing} is a file; {fix}")
    if not os.access(existing, os.W_OK | os.X_OK):
        where = "" if existing == folder else f" (its nearest existing folder {existing} is not writable)"
        raise InvalidConfig(f"{STATE_DIR_SETTING}: {folder} is not writable by this user{where}; {fix}")


class ControlStore:
    """This worker's c_i on its disk, one safetensors file per (run, round) in `folder`
    (jetfed.round_files: versioned by round, so a round run again after a coordinator's
    crash starts from the c_i of the round before it, and a resumed run is the unbroken
    one bit for bit)."""

    def __init__(self, folder: Path, model: str) -> None:
        self._files = RoundFiles(folder, model, prefix="scaffold", kind=_KIND, noun="control variate",
                                 owner="SCAFFOLD's control variate", fresh="from zeros")

    @property
    def folder(self) -> Path:
        return self._files.folder

    def load(self, run_id: str, round_number: int, like: Mapping[str, torch.Tensor]) -> StateDict:
        """The c_i for `round_number` of `run_id`: what the newest earlier round saved,
        else zeros shaped like `like` (the server's c). A file that does not hold a
        control variate of this run and model is refused, naming it."""
        newest = self._files.newest_before(run_id, round_number)
        if newest is None:
            log.info("scaffold run=%s round=%d: no control variate from an earlier round here: starting from zeros",
                     echo(run_id) or '""', round_number)
            return {name: torch.zeros_like(tensor, device="cpu") for name, tensor in like.items()}
        number, path = newest
        control = self._files.read(path, run_id, number, like)
        log.info("scaffold run=%s round=%d: control variate of round %d", echo(run_id) or '""', round_number, number)
        return control

    def save(self, run_id: str, round_number: int, control: Mapping[str, torch.Tensor]) -> Path:
        """Keep the c_i `round_number` of `run_id` produced (jetfed.round_files says what goes)."""
        return self._files.save(run_id, round_number, control)


