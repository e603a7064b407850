"""--init-weights files: safetensors only (nothing unpickled), checked before the fleet
is awaited; and a start that is not the fleet's model is refused naming both."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from coordinator.fleet_model import FleetModel
from coordinator.initial_weights import Start, read_file
from jetfed import codec
from jetfed.errors import InvalidConfig

LIMIT = 1 << 20


def state() -> dict:
    return {"fc.weight": torch.ones(3, 4), "fc.bias": torch.zeros(3), "steps": torch.tensor(5)}


def fleet_of(tensors: dict, model: str = "tiny") -> FleetModel:
    return FleetModel("mnist", model, codec.spec_digest(codec.spec_of(tensors)), (), "alice")


def test_a_safetensors_state_dict_is_read_whole(tmp_path: Path) -> None:
    path = tmp_path / "init.safetensors"
    save_file(state(), str(path))
    read = read_file(path, LIMIT)
    assert set(read) == set(state()) and all(torch.equal(read[k], v) for k, v in state().items())


@pytest.mark.parametrize("content, problem", [
    (pickle.dumps({"fc.weight": [1.0]}), "not a safetensors file"),
    (b"", "not a safetensors file"),
])
def test_other_files_are_refused_naming_the_file(tmp_path: Path, content: bytes, problem: str) -> None:
    path = tmp_path / "init.pt"
    path.write_bytes(content)
    with pytest.raises(InvalidConfig, match=rf"^--init-weights {path}: {problem}"):
        read_file(path, LIMIT)


def test_non_finite_weights_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "init.safetensors"
    save_file({"w": torch.tensor([1.0, float("nan")])}, str(path))
    with pytest.raises(InvalidConfig, match=rf"^--init-weights {path}: .*'w' holds NaN or Inf"):
        read_file(path, LIMIT)


def test_an_empty_or_oversized_file_is_refused(tmp_path: Path) -> None:
    empty = tmp_path / "empty.safetensors"
    save_file({}, str(empty))
    with pytest.raises(InvalidConfig, match="holds no tensors"):
        read_file(empty, LIMIT)
    big = tmp_path / "big.safetensors"
    save_file({"w": torch.zeros(1024)}, str(big))
    with pytest.raises(InvalidConfig, match=r"more than the 1000 a model may have here \(--max-payload-bytes\)"):
        read_file(big, 1000)


def test_a_missing_file_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(InvalidConfig, match="cannot read it: No such file"):
        read_file(tmp_path / "nope.safetensors", LIMIT)


def test_the_start_must_be_the_fleets_architecture() -> None:
    file_start = Start(state(), "--init-weights init.safetensors")
    assert file_start.problem(fleet_of(state())) is None
    other = {**state(), "fc.weight": torch.ones(4, 4)}
    problem = file_start.problem(fleet_of(other))
    assert problem is not None
    assert problem.startswith(f"--init-weights init.safetensors holds other tensors (digest {file_start.digest[:12]}) "
                              f"than the fleet's model tiny (digest {fleet_of(other).digest[:12]}, worker alice)")
    assert "'net.'" in problem


def test_a_checkpoint_must_be_the_fleets_model() -> None:
    checkpoint = Start(state(), "the checkpoint of round 3", model="tiny")
    assert checkpoint.problem(fleet_of(state())) is None
    problem = checkpoint.problem(fleet_of(state(), model="resnet18"))
    assert problem == ("the checkpoint of round 3 holds model tiny, but the fleet (worker alice) runs resnet18: start "
                       "the boards as for the run being resumed (--model tiny)")
