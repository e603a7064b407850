"""Top-k's error-feedback residual on the worker (jetfed.compression): what a round's
top-k update did not send, added to the next round's delta so no training is lost,
only delayed. Kept on the board's disk per run and round under --state-dir as
SCAFFOLD's c_i is (jetfed.round_files), so a restarted worker sends what it still
owes, and a round run again after a coordinator's crash uses the residual of the round
before it, not the one the killed round saved."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Mapping, Optional, Tuple

import torch

from jetfed.round_files import RoundFiles

_KIND = "jetfed top-k error-feedback residual"

StateDict = Dict[str, torch.Tensor]


class ResidualStore:
    """The residual per (run, round) in `folder`, or in memory when `folder` is None
    (a worker without --state-dir: a restart then loses what was owed, said once)."""

    def __init__(self, folder: Optional[Path], model: str) -> None:
        self.folder = folder
        self._files = None if folder is None else RoundFiles(
            folder, model, prefix="residual", kind=_KIND, noun="top-k residual", owner="the top-k residual",
            fresh="afresh")
        self._memory: Dict[Tuple[str, int], StateDict] = {}

    def load(self, run_id: str, round_number: int, like: Mapping[str, torch.Tensor]) -> Optional[StateDict]:
        """The residual the newest round before `round_number` left, or None (nothing
        owed). One whose tensors are not `like`'s F32 tensors is refused, naming it."""
        if self._files is None:
            earlier = [r for (run, r) in self._memory if run == run_id and r < round_number]
            return self._memory[(run_id, max(earlier))] if earlier else None
        newest = self._files.newest_before(run_id, round_number)
        if newest is None:
            return None
        number, path = newest
        return self._files.read(path, run_id, number, {n: t for n, t in like.items() if t.dtype == torch.float32})

    def save(self, run_id: str, round_number: int, residual: Mapping[str, torch.Tensor]) -> None:
        if self._files is not None:
            self._files.save(run_id, round_number, residual)
            return
        tensors = {name: t.detach().to("cpu").contiguous() for name, t in residual.items()}
        self._memory = {k: v for k, v in self._memory.items() if k[0] == run_id and k[1] < round_number}
        if self._memory:
            newest = max(self._memory)
            self._memory = {newest: self._memory[newest]}
        self._memory[(run_id, round_number)] = tensors
