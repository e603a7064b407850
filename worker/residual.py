"""Top-k's error-feedback residual on the worker (jetfed.compression): what a round's
top-k update did not send, added to the next round's delta so no training is lost,
only delayed. Kept on the board's disk per run under --state-dir, as SCAFFOLD's c_i
is (jetfed.scaffold.ControlStore), so a restarted worker sends what it still owes.

Versioned by round for the same reason as c_i: a coordinator killed during round r
and resumed asks for round r again; the residual the killed round r saved must not be
used, the one of the newest earlier round must. Files of other runs are deleted when
a run saves (a worker serves one run at a time). Safetensors with metadata, written
atomically, never pickled."""

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
_FILE = re.compile(r"residual-([0-9a-f]{16})-(\d+)\.safetensors")
_KIND = "jetfed top-k error-feedback residual"

StateDict = Dict[str, torch.Tensor]


def _run_key(run_id: str) -> str:
    return hashlib.sha256(run_id.encode("utf-8")).hexdigest()[:16]


class ResidualStore:
    """The residual per (run, round) in `folder`, or in memory when `folder` is None
    (a worker without --state-dir: a restart then loses what was owed, said once)."""

    def __init__(self, folder: Optional[Path], model: str) -> None:
        self.folder = folder
        self._model = model
        self._memory: Dict[Tuple[str, int], StateDict] = {}

    def load(self, run_id: str, round_number: int, like: Mapping[str, torch.Tensor]) -> Optional[StateDict]:
        """The residual the newest round before `round_number` left, or None (nothing
        owed). One whose tensors are not `like`'s F32 tensors is refused, naming it."""
        if self.folder is None:
            earlier = [r for (run, r) in self._memory if run == run_id and r < round_number]
            return self._memory[(run_id, max(earlier))] if earlier else None
        earlier_files = [(number, path) for number, path in self._files(run_id) if number < round_number]
        if not earlier_files:
            return None
        number, path = max(earlier_files)
        residual = self._read(path, run_id, number)
        expected = codec.spec_of({n: t for n, t in like.items() if t.dtype == torch.float32})
        if codec.spec_of(residual) != expected:
            raise WorkerStateError(f"{STATE_DIR_SETTING}: {path} holds tensors other than this model's top-k "
                                   f"residual ({self._model}); delete it to start run {echo(run_id)!r} afresh")
        return residual

    def save(self, run_id: str, round_number: int, residual: Mapping[str, torch.Tensor]) -> None:
        tensors = {name: t.detach().to("cpu").contiguous() for name, t in residual.items()}
        if self.folder is None:
            self._memory = {k: v for k, v in self._memory.items() if k[0] == run_id and k[1] < round_number}
            if self._memory:
                newest = max(self._memory)
                self._memory = {newest: self._memory[newest]}
            self._memory[(run_id, round_number)] = tensors
            return
        try:
            self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            path = self.folder / f"residual-{_run_key(run_id)}-{round_number}.safetensors"
            metadata = {"kind": _KIND, "run_id": run_id, "round": str(round_number), "model": self._model}
            write_atomically(path, st_save(tensors, metadata=metadata))
            self._prune(run_id, round_number)
        except OSError as exc:
            raise WorkerStateError(f"{STATE_DIR_SETTING}: cannot keep the top-k residual in {self.folder}: {exc}; "
                                   f"give {STATE_DIR_SETTING} a folder this user may write") from None

    def _prune(self, run_id: str, round_number: int) -> None:
        assert self.folder is not None
        own = self._files(run_id)
        earlier = sorted(number for number, _ in own if number < round_number)
        keep = set(earlier[-(KEEP_ROUNDS - 1):]) | {round_number}
        for number, path in own:
            if number not in keep:
                path.unlink()
        key = _run_key(run_id)
        for path in sorted(self.folder.glob("residual-*.safetensors")):
            match = _FILE.fullmatch(path.name)
            if match is not None and match.group(1) != key:
                log.warning("residual run=%s: deleted %s, another run's top-k residual", echo(run_id) or '""', path)
                path.unlink()

    def _files(self, run_id: str) -> List[Tuple[int, Path]]:
        assert self.folder is not None
        if not self.folder.is_dir():
            return []
        found = []
        for path in self.folder.glob(f"residual-{_run_key(run_id)}-*.safetensors"):
            match = _FILE.fullmatch(path.name)
            if match is not None:
                found.append((int(match.group(2)), path))
        return found

    def _read(self, path: Path, run_id: str, round_number: int) -> StateDict:
        delete = f"delete it to start run {echo(run_id)!r} afresh"
        try:
            data = path.read_bytes()
            metadata = _metadata(data)
            state = st_load(data)
        except (OSError, SafetensorError, ValueError, struct.error) as exc:
            raise WorkerStateError(f"{STATE_DIR_SETTING}: {path} cannot be read as a top-k residual ({exc}); "
                                   f"{delete}") from None
        said = (metadata.get("kind"), metadata.get("run_id"), metadata.get("round"), metadata.get("model"))
        if said != (_KIND, run_id, str(round_number), self._model):
            raise WorkerStateError(f"{STATE_DIR_SETTING}: {path} says it is {echo(str(said))}, not the top-k residual "
                                   f"of run {echo(run_id)!r} round {round_number} of {self._model}; {delete}")
        try:
            codec.require_finite(state, who=str(path))
        except NonFiniteWeights as exc:
            raise WorkerStateError(f"{STATE_DIR_SETTING}: {exc}; {delete}") from None
        return state


def _metadata(data: bytes) -> Dict[str, str]:
    if len(data) < 8:
        raise ValueError("shorter than a safetensors header")
    (length,) = struct.unpack("<Q", data[:8])
    if length > len(data) - 8:
        raise ValueError("header longer than the file")
    header = json.loads(data[8:8 + length])
    metadata = header.get("__metadata__", {}) if isinstance(header, dict) else {}
    return metadata if isinstance(metadata, dict) else {}
