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

import hashlib
import inspect
import json
import logging
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Tuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from jetfed import codec
from jetfed.durable import write_atomically
from jetfed.errors import InvalidConfig, NonFiniteWeights, WorkerStateError
from jetfed.status import echo

log = logging.getLogger(__name__)

CONTROL_PREFIX = "control/"
STATE_DIR_SETTING = "--state-dir"
# A round run again (its coordinator resumed) needs the c_i of the round before it.
KEEP_ROUNDS = 2
_FILE = re.compile(r"scaffold-([0-9a-f]{16})-(\d+)\.safetensors")
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
        return sum((drift * p).sum() for p, drift in self._pairs)


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
    (created 0700 on first use), written atomically and never pickled.

    Versioned by round: the c_i a round produced is saved tagged with it, and a round
    starts from the newest c_i tagged with an earlier one. A coordinator killed during
    round 4 and resumed runs round 4 again; the round 4 it killed may have saved its c_i
    already, and the round run again must not start from that one but from round 3's,
    so the resumed run is the unbroken one bit for bit. Saving round r removes the run's
    files of later rounds (a timeline abandoned) and all but the newest before r; the
    files of other runs go too, said in the log: a worker serves one run at a time."""

    def __init__(self, folder: Path, model: str) -> None:
        self.folder = folder
        self._model = model

    def load(self, run_id: str, round_number: int, like: Mapping[str, torch.Tensor]) -> StateDict:
        """The c_i for `round_number` of `run_id`: what the newest earlier round saved,
        else zeros shaped like `like` (the server's c). A file that does not hold a
        control variate of this run and model is refused, naming it."""
        earlier = [(number, path) for number, path in self._files(run_id) if number < round_number]
        if not earlier:
            log.info("scaffold run=%s round=%d: no control variate from an earlier round here: starting from zeros",
                     echo(run_id) or '""', round_number)
            return {name: torch.zeros_like(tensor, device="cpu") for name, tensor in like.items()}
        number, path = max(earlier)
        control = self._read(path, run_id, number)
        expected = codec.spec_of(like)
        if codec.spec_of(control) != expected:
            raise WorkerStateError(f"{STATE_DIR_SETTING}: {path} holds tensors other than this model's control "
                                   f"variate ({self._model}); delete it to start run {echo(run_id)!r} from zeros")
        log.info("scaffold run=%s round=%d: control variate of round %d", echo(run_id) or '""', round_number, number)
        return control

    def save(self, run_id: str, round_number: int, control: Mapping[str, torch.Tensor]) -> Path:
        """Keep the c_i `round_number` of `run_id` produced (see the class for what goes)."""
        try:
            self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            path = self.folder / f"scaffold-{_run_key(run_id)}-{round_number}.safetensors"
            metadata = {"kind": _KIND, "run_id": run_id, "round": str(round_number), "model": self._model}
            tensors = {name: t.detach().to("cpu").contiguous() for name, t in control.items()}
            write_atomically(path, st_save(tensors, metadata=metadata))
            self._prune(run_id, round_number)
        except OSError as exc:
            raise WorkerStateError(f"{STATE_DIR_SETTING}: cannot keep SCAFFOLD's control variate in {self.folder}: "
                                   f"{exc}; give {STATE_DIR_SETTING} a folder this user may write") from None
        return path

    def _prune(self, run_id: str, round_number: int) -> None:
        own = self._files(run_id)
        earlier = sorted(number for number, _ in own if number < round_number)
        keep = set(earlier[-(KEEP_ROUNDS - 1):]) | {round_number}
        for number, path in own:
            if number not in keep:
                path.unlink()
        key = _run_key(run_id)
        others: Dict[str, List[int]] = {}
        for path in sorted(self.folder.glob("scaffold-*.safetensors")):
            match = _FILE.fullmatch(path.name)
            if match is None or match.group(1) == key:
                continue
            others.setdefault(_stored_run(path), []).append(int(match.group(2)))
            path.unlink()
        if others:
            gone = "; ".join(f"run {echo(run)!r} rounds {sorted(rounds)}" for run, rounds in sorted(others.items()))
            log.warning("scaffold run=%s: deleted the control variates of other runs in %s: %s", echo(run_id) or '""',
                        self.folder, gone)

    def _files(self, run_id: str) -> List[Tuple[int, Path]]:
        if not self.folder.is_dir():
            return []
        key = _run_key(run_id)
        found = []
        for path in self.folder.glob(f"scaffold-{key}-*.safetensors"):
            match = _FILE.fullmatch(path.name)
            if match is not None:
                found.append((int(match.group(2)), path))
        return found

    def _read(self, path: Path, run_id: str, round_number: int) -> StateDict:
        """A saved c_i, read into fresh memory and checked against what its name says."""
        delete = f"delete it to start run {echo(run_id)!r} from zeros"
        try:
            data = path.read_bytes()
            metadata = _metadata(data)
            state = st_load(data)
        except (OSError, SafetensorError, ValueError) as exc:
            raise WorkerStateError(f"{STATE_DIR_SETTING}: {path} cannot be read as a control variate ({exc}); "
                                   f"{delete}") from None
        said = (metadata.get("kind"), metadata.get("run_id"), metadata.get("round"), metadata.get("model"))
        if said != (_KIND, run_id, str(round_number), self._model):
            raise WorkerStateError(f"{STATE_DIR_SETTING}: {path} says it is {echo(str(said))}, not the control "
                                   f"variate of run {echo(run_id)!r} round {round_number} of {self._model}; {delete}")
        try:
            codec.require_finite(state, who=str(path))
        except NonFiniteWeights as exc:
            raise WorkerStateError(f"{STATE_DIR_SETTING}: {exc}; {delete}") from None
        return state


def _run_key(run_id: str) -> str:
    """A run id as a file name may hold it: any text becomes 16 hex digits."""
    return hashlib.sha256(run_id.encode("utf-8")).hexdigest()[:16]


def _metadata(data: bytes) -> Dict[str, str]:
    """A safetensors file's __metadata__: 8 bytes of header length, then the JSON header."""
    if len(data) < 8:
        raise ValueError("shorter than a safetensors header")
    (length,) = struct.unpack("<Q", data[:8])
    if length > len(data) - 8:
        raise ValueError("header longer than the file")
    header = json.loads(data[8:8 + length])
    metadata = header.get("__metadata__", {}) if isinstance(header, dict) else {}
    return metadata if isinstance(metadata, dict) else {}


def _stored_run(path: Path) -> str:
    """The run id a file says it belongs to, for the log; its key if it cannot say."""
    try:
        with path.open("rb") as handle:
            head = handle.read(8)
            (length,) = struct.unpack("<Q", head)
            return str(_metadata(head + handle.read(min(length, 1 << 20))).get("run_id"))
    except (OSError, ValueError, struct.error):
        match = _FILE.fullmatch(path.name)
        return f"key {match.group(1)}" if match else path.name
