"""Crash-safe run state: after every completed round the global model and the run's
state are written to temporary names, synced, and renamed into place (the folder synced
too), so a coordinator killed or a machine losing power at any instant resumes from the
last whole round.

The state file names the model file and its SHA-256; the model file carries its round
in its name, so the two can never be paired wrongly. The state file also carries the
round's metrics record: it is written before metrics.jsonl, so a crash between the two
leaves a record that --resume puts back, never a metrics line without its checkpoint.
And it carries the run's id, so a resumed run is the same run to the workers, and the
strategy's state (server moments, a clipping center) in its own safetensors file, named
and hashed like the model, so a resumed run takes the same steps as an unbroken one.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from jetfed.codec import StateDict
from jetfed.durable import write_atomically
from jetfed.errors import JetfedError

STATE_FILE = "state.json"
MAX_RUN_ID_CHARS = 128  # the longest run id a worker accepts in a Train header


class CheckpointError(JetfedError):
    """A checkpoint that exists but cannot be trusted; resuming from it would be a guess."""


@dataclass(frozen=True)
class Checkpoint:
    round: int
    state: StateDict
    run: Dict[str, Any]
    # The round's metrics.jsonl record; None in checkpoints written before it was kept.
    record: Optional[Dict[str, Any]] = None
    # The run's id (see Federation.run_id); None in checkpoints written before it was kept.
    run_id: Optional[str] = None
    # The strategy's tensors and values (Strategy.state_dict); None before they were kept.
    strategy: Optional[Tuple[StateDict, Dict[str, Any]]] = None


def write_model(path: Path, state: StateDict, model: str, round_number: int) -> None:
    """A whole safetensors model at `path` or none: written aside, synced, then renamed.
    Written by us rather than safetensors' save_file, which creates files 0600: a model
    gets the same mode as the run's other outputs (0666 less the umask)."""
    data = safetensors_bytes({k: v.contiguous() for k, v in state.items()}, metadata={"model": model, "round": str(round_number)})
    write_atomically(path, data)


def save(
    folder: Path, round_number: int, state: StateDict, model: str, run: Dict[str, Any], record: Dict[str, Any],
    run_id: Optional[str] = None, strategy: Optional[Tuple[StateDict, Dict[str, Any]]] = None,
) -> Path:
    """Checkpoint a completed round: its model and strategy state, then the state file
    naming them (the commit point), then the older files go. `run_id` sits beside
    `run`, not in it: `run` is what a resumption must match, the id is what it takes over."""
    folder.mkdir(parents=True, exist_ok=True)
    model_path = folder / f"global-{round_number:06d}.safetensors"
    write_model(model_path, state, model, round_number)
    digest = hashlib.sha256(model_path.read_bytes()).hexdigest()
    saved = {"round": round_number, "model_file": model_path.name, "sha256": digest, "run": run, "record": record,
             "run_id": run_id or None}
    kept = {model_path}
    if strategy is not None:
        tensors, values = strategy
        strategy_path = folder / f"strategy-{round_number:06d}.safetensors"
        data = safetensors_bytes({k: v.contiguous() for k, v in tensors.items()}, metadata={"round": str(round_number)})
        write_atomically(strategy_path, data)
        saved["strategy"] = {"file": strategy_path.name, "sha256": hashlib.sha256(data).hexdigest(), "values": values}
        kept.add(strategy_path)
    write_atomically(folder / STATE_FILE, json.dumps(saved, indent=2, sort_keys=True).encode())
    for pattern in ("global-*.safetensors", "strategy-*.safetensors"):
        for old in folder.glob(pattern):
            if old not in kept:
                old.unlink()
    return model_path


def saved_round(folder: Path) -> Optional[int]:
    """The round the checkpoint in `folder` holds, read from its state file alone (no
    model loaded, nothing verified); None when there is none or it cannot be read."""
    try:
        return int(json.loads((folder / STATE_FILE).read_text())["round"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def load(folder: Path) -> Optional[Checkpoint]:
    """The last completed round, or None when no checkpoint was ever written."""
    state_path = folder / STATE_FILE
    if not state_path.exists():
        return None
    try:
        record = json.loads(state_path.read_text())
        model_path = folder / record["model_file"]
        digest = hashlib.sha256(model_path.read_bytes()).hexdigest()
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"checkpoint {state_path}: unreadable: {exc}") from exc
    if digest != record["sha256"]:
        raise CheckpointError(f"checkpoint {model_path}: sha256 {digest} does not match {state_path}")
    run_id = record.get("run_id")
    if run_id is not None and not (isinstance(run_id, str) and run_id.isprintable() and
                                   0 < len(run_id) <= MAX_RUN_ID_CHARS):
        raise CheckpointError(f"checkpoint {state_path}: run_id must be 1 to {MAX_RUN_ID_CHARS} printable characters, "
                              f"not {run_id!r:.80}")
    return Checkpoint(int(record["round"]), load_file(str(model_path)), record["run"], record.get("record"), run_id,
                      _strategy(folder, state_path, record.get("strategy")))


def _strategy(folder: Path, state_path: Path, saved: Any) -> Optional[Tuple[StateDict, Dict[str, Any]]]:
    """The strategy state the state file names, proven by its SHA-256."""
    if saved is None:
        return None
    try:
        path = folder / saved["file"]
        data = path.read_bytes()
        values = saved["values"]
    except (OSError, KeyError, TypeError) as exc:
        raise CheckpointError(f"checkpoint {state_path}: strategy state unreadable: {exc}") from exc
    if hashlib.sha256(data).hexdigest() != saved.get("sha256") or not isinstance(values, dict):
        raise CheckpointError(f"checkpoint {path}: sha256 does not match {state_path}")
    return load_file(str(path)), values

