"""A worker's per-run, per-round state on its disk (--state-dir): one safetensors file
per (run, round), written atomically, never pickled, checked against what its name
and metadata say when read. SCAFFOLD's c_i (jetfed.scaffold.ControlStore) and top-k's
error-feedback residual (worker.residual.ResidualStore) are both kept so.

Versioned by round: a round starts from the newest file tagged with an earlier round.
A coordinator killed during round 4 and resumed runs round 4 again; the round 4 it
killed may have saved already, and the round run again must not start from that file
but from round 3's, so the resumed run is the unbroken one bit for bit. Saving round r
removes the run's files of later rounds (a timeline abandoned) and all but the newest
before r; the files of other runs go too, said in the log: a worker serves one run at
a time."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import struct
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Tuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from jetfed import codec
from jetfed.durable import write_atomically
from jetfed.errors import NonFiniteWeights, WorkerStateError
from jetfed.status import echo

log = logging.getLogger(__name__)

STATE_DIR_SETTING = "--state-dir"
KEEP_ROUNDS = 2

StateDict = Dict[str, torch.Tensor]


class RoundFiles:
    """Files `<prefix>-<run key>-<round>.safetensors` in `folder` (created 0700 on first
    use) holding one kind of tensors; `noun` names them in errors ("control variate"),
    `owner` in a failed save ("SCAFFOLD's control variate"), `fresh` says how a run
    starts once a bad file is deleted ("from zeros")."""

    def __init__(self, folder: Path, model: str, *, prefix: str, kind: str, noun: str, owner: str,
                 fresh: str) -> None:
        self.folder = folder
        self.model = model
        self._prefix, self._kind, self._noun, self._owner, self._fresh = prefix, kind, noun, owner, fresh
        self._pattern = re.compile(re.escape(prefix) + r"-([0-9a-f]{16})-(\d+)\.safetensors")

    def newest_before(self, run_id: str, round_number: int) -> Optional[Tuple[int, Path]]:
        """The (round, file) of the newest round of `run_id` before `round_number`, if any."""
        earlier = [(number, path) for number, path in self._files(run_id) if number < round_number]
        return max(earlier) if earlier else None

    def read(self, path: Path, run_id: str, round_number: int, like: Mapping[str, torch.Tensor]) -> StateDict:
        """The tensors `path` holds, read into fresh memory, refused (naming the file and
        the fix) unless it says it is this kind for `run_id`, `round_number` and the
        model, holds exactly `like`'s tensors and only finite values."""
        delete = f"delete it to start run {echo(run_id)!r} {self._fresh}"
        try:
            data = path.read_bytes()
            metadata = _metadata(data)
            state = st_load(data)
        except (OSError, SafetensorError, ValueError, struct.error) as exc:
            raise WorkerStateError(f"{STATE_DIR_SETTING}: {path} cannot be read as a {self._noun} ({exc}); "
                                   f"{delete}") from None
        said = (metadata.get("kind"), metadata.get("run_id"), metadata.get("round"), metadata.get("model"))
        if said != (self._kind, run_id, str(round_number), self.model):
            raise WorkerStateError(f"{STATE_DIR_SETTING}: {path} says it is {echo(str(said))}, not the {self._noun} "
                                   f"of run {echo(run_id)!r} round {round_number} of {self.model}; {delete}")
        try:
            codec.require_finite(state, who=str(path))
        except NonFiniteWeights as exc:
            raise WorkerStateError(f"{STATE_DIR_SETTING}: {exc}; {delete}") from None
        if codec.spec_of(state) != codec.spec_of(like):
            raise WorkerStateError(f"{STATE_DIR_SETTING}: {path} holds tensors other than this model's {self._noun} "
                                   f"({self.model}); {delete}")
        return state

    def save(self, run_id: str, round_number: int, tensors: Mapping[str, torch.Tensor]) -> Path:
        """Keep what `round_number` of `run_id` produced (see the module for what goes)."""
        try:
            self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            path = self.folder / f"{self._prefix}-{_run_key(run_id)}-{round_number}.safetensors"
            metadata = {"kind": self._kind, "run_id": run_id, "round": str(round_number), "model": self.model}
            contiguous = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
            write_atomically(path, st_save(contiguous, metadata=metadata))
            self._prune(run_id, round_number)
        except OSError as exc:
            raise WorkerStateError(f"{STATE_DIR_SETTING}: cannot keep {self._owner} in {self.folder}: {exc}; "
                                   f"give {STATE_DIR_SETTING} a folder this user may write") from None
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
        for path in sorted(self.folder.glob(f"{self._prefix}-*.safetensors")):
            match = self._pattern.fullmatch(path.name)
            if match is None or match.group(1) == key:
                continue
            others.setdefault(self._stored_run(path), []).append(int(match.group(2)))
            path.unlink()
        if others:
            gone = "; ".join(f"run {echo(run)!r} rounds {sorted(rounds)}" for run, rounds in sorted(others.items()))
            log.warning("%s run=%s: deleted the %ss of other runs in %s: %s", self._prefix, echo(run_id) or '""',
                        self._noun, self.folder, gone)

    def _files(self, run_id: str) -> List[Tuple[int, Path]]:
        if not self.folder.is_dir():
            return []
        found = []
        for path in self.folder.glob(f"{self._prefix}-{_run_key(run_id)}-*.safetensors"):
            match = self._pattern.fullmatch(path.name)
            if match is not None:
                found.append((int(match.group(2)), path))
        return found

    def _stored_run(self, path: Path) -> str:
        """The run id a file says it belongs to, for the log; its key if it cannot say."""
        try:
            with path.open("rb") as handle:
                head = handle.read(8)
                (length,) = struct.unpack("<Q", head)
                return str(_metadata(head + handle.read(min(length, 1 << 20))).get("run_id"))
        except (OSError, ValueError, struct.error):
            match = self._pattern.fullmatch(path.name)
            return f"key {match.group(1)}" if match else path.name


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
