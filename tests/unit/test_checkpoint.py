"""Checkpoint files: whole or absent, round-tripped exactly, and readable like the
run's other outputs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from coordinator import checkpoint


def state() -> dict:
    return {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "n": torch.tensor(3)}


def test_a_checkpoint_round_trips_exactly(tmp_path: Path) -> None:
    checkpoint.save(tmp_path, 7, state(), "mnist-cnn", {"seed": 1}, {"round": 7, "lr": 0.1})
    saved = checkpoint.load(tmp_path)
    assert saved is not None and saved.round == 7 and saved.run == {"seed": 1}
    assert saved.record == {"round": 7, "lr": 0.1}
    assert all(torch.equal(saved.state[k], v) for k, v in state().items())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["global-000007.safetensors", "state.json"]


def test_the_model_file_has_the_mode_of_the_other_outputs(tmp_path: Path) -> None:
    """safetensors' save_file creates 0600 files; the model must follow the umask like
    metrics.jsonl does, so a report or a copy by another user works."""
    old = os.umask(0o022)
    try:
        checkpoint.write_model(tmp_path / "model.safetensors", state(), "mnist-cnn", 40)
        (tmp_path / "metrics.jsonl").write_text("{}\n")
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert modes == {"model.safetensors": 0o644, "metrics.jsonl": 0o644}
    loaded = load_file(str(tmp_path / "model.safetensors"))
    assert torch.equal(loaded["w"], state()["w"])


def test_saved_round_reads_the_state_file_alone(tmp_path: Path) -> None:
    assert checkpoint.saved_round(tmp_path) is None
    checkpoint.save(tmp_path, 7, state(), "mnist-cnn", {"seed": 1}, {"round": 7})
    assert checkpoint.saved_round(tmp_path) == 7
    (tmp_path / checkpoint.STATE_FILE).write_text("{torn")
    assert checkpoint.saved_round(tmp_path) is None


def test_the_run_id_is_kept_beside_the_run_not_in_it(tmp_path: Path) -> None:
    checkpoint.save(tmp_path, 7, state(), "mnist-cnn", {"seed": 1}, {"round": 7}, run_id="0123456789abcdef")
    saved = checkpoint.load(tmp_path)
    assert saved is not None and saved.run_id == "0123456789abcdef" and saved.run == {"seed": 1}


def test_a_checkpoint_written_before_run_ids_loads_without_one(tmp_path: Path) -> None:
    checkpoint.save(tmp_path, 7, state(), "mnist-cnn", {"seed": 1}, {"round": 7}, run_id="0123456789abcdef")
    state_file = tmp_path / checkpoint.STATE_FILE
    saved = json.loads(state_file.read_text())
    del saved["run_id"]
    state_file.write_text(json.dumps(saved))
    loaded = checkpoint.load(tmp_path)
    assert loaded is not None and loaded.run_id is None and loaded.round == 7


@pytest.mark.parametrize("run_id", [7, "", "x" * 129, "two\nlines"])
def test_a_run_id_no_coordinator_writes_is_refused(tmp_path: Path, run_id: object) -> None:
    checkpoint.save(tmp_path, 7, state(), "mnist-cnn", {"seed": 1}, {"round": 7})
    state_file = tmp_path / checkpoint.STATE_FILE
    state_file.write_text(json.dumps({**json.loads(state_file.read_text()), "run_id": run_id}))
    with pytest.raises(checkpoint.CheckpointError, match="run_id must be 1 to 128 printable characters"):
        checkpoint.load(tmp_path)
