"""SCAFFOLD on the worker: the correction's gradient, the option II control update,
plain SGD when both control variates are zero, the payload's layout, and the store
that keeps c_i per run and round on the board's disk."""

from __future__ import annotations

import logging
import math
import os
import stat
from pathlib import Path
from typing import Dict

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from jetfed import codec
from jetfed.config import TrainConfig
from jetfed.errors import InvalidConfig, WorkerStateError
from jetfed.scaffold import (
    CONTROL_PREFIX, ControlStore, ControlVariates, Correction, join_controls, next_client_control, split_controls,
    state_dir, takes_controls, train_spec, zero_controls,
)
from jetfed.tasks import TaskSettings
from jetfed.tasks.base import TensorExamples
from jetfed.tasks.mnist import MnistTask
from jetfed.training import train_round
from tests.unit.tiny_training import CPU, fresh_cnn, random_digits


def mnist_task() -> MnistTask:
    return MnistTask(TaskSettings(data_dir=Path("."), device=CPU))


def filled(like: Dict[str, torch.Tensor], value: float) -> Dict[str, torch.Tensor]:
    return {name: torch.full_like(tensor, value) for name, tensor in like.items()}


def test_the_correction_adds_c_minus_ci_to_every_gradient() -> None:
    model = nn.Linear(3, 2)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.5, -1.0, 2.0], [0.0, 0.25, -0.125]]))
        model.bias.copy_(torch.tensor([3.0, -0.5]))
    server = {"weight": torch.tensor([[1.0, 2.0, 3.0], [-1.0, 0.5, 0.0]]), "bias": torch.tensor([0.25, -4.0])}
    client = {"weight": torch.tensor([[0.5, 2.0, -1.0], [1.0, 0.5, 0.125]]), "bias": torch.tensor([0.0, 1.0])}
    correction = Correction(model, ControlVariates(server, client))

    # Alone, the term's gradient is c - c_i exactly: [[0.5, 0, 4], [-2, 0, -0.125]] and [0.25, -5].
    model.zero_grad()
    correction().backward()
    assert torch.equal(model.weight.grad, torch.tensor([[0.5, 0.0, 4.0], [-2.0, 0.0, -0.125]]))
    assert torch.equal(model.bias.grad, torch.tensor([0.25, -5.0]))
    # Its value: sum((c - c_i) * w) = 0.25 + 0 + 8 + 0 + 0 + 0.015625 + 0.75 + 2.5.
    assert float(correction().detach()) == pytest.approx(11.515625)

    # Beside a task loss, it adds the same to the task's gradient.
    inputs, targets = torch.randn(5, 3), torch.tensor([0, 1, 1, 0, 1])
    model.zero_grad()
    F.cross_entropy(model(inputs), targets).backward()
    task = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    (F.cross_entropy(model(inputs), targets) + correction()).backward()
    for p, g, name in zip(model.parameters(), task, ("weight", "bias")):
        assert torch.allclose(p.grad - g, server[name] - client[name], atol=1e-6)


def test_the_control_update_by_hand() -> None:
    """c_i+ = c_i - c + (x - y) / (K lr): x 1.0, y 0.4, K 3, lr 0.1 gives (x - y) / 0.3 = 2."""
    controls = ControlVariates(server={"w": torch.tensor([0.5, -1.0])}, client={"w": torch.tensor([0.25, 0.0])})
    start, trained = {"w": torch.tensor([1.0, 1.0])}, {"w": torch.tensor([0.4, 1.3])}
    updated = next_client_control(controls, start, trained, steps=3, lr=0.1)
    # [0.25 - 0.5 + 2, 0 + 1 - 1] = [1.75, 0]
    assert torch.allclose(updated["w"], torch.tensor([1.75, 0.0]), atol=1e-6)
    assert updated["w"].dtype == torch.float32


def test_the_update_is_taken_in_float64_and_kept_in_the_tensors_dtype() -> None:
    """In float16, (x - y) / (K lr) for x 1, y 1 - 2^-10 rounds (1 - y in float16 is exact,
    but 1/(K lr) is not): float64 then one rounding gives the nearest float16."""
    controls = ControlVariates(server={"h": torch.zeros(1, dtype=torch.float16)},
                               client={"h": torch.zeros(1, dtype=torch.float16)})
    start = {"h": torch.ones(1, dtype=torch.float16)}
    trained = {"h": torch.tensor([1 - 2**-10], dtype=torch.float16)}
    updated = next_client_control(controls, start, trained, steps=3, lr=0.1)["h"]
    assert updated.dtype == torch.float16
    assert updated.item() == torch.tensor([2**-10 / 0.3], dtype=torch.float64).half().item()


def test_a_round_without_steps_keeps_ci() -> None:
    controls = ControlVariates(server={"w": torch.ones(2)}, client={"w": torch.tensor([0.5, 2.0])})
    kept = next_client_control(controls, {"w": torch.zeros(2)}, {"w": torch.zeros(2)}, steps=0, lr=0.1)
    assert torch.equal(kept["w"], torch.tensor([0.5, 2.0]))


def test_sgd_steps_with_the_correction_by_hand_and_the_task_loss_reported() -> None:
    """A linear model from zero on inputs of ones, loss = the batch's mean output sum:
    every parameter's task gradient is 1, so with c 0.3 and c_i 0.1 each SGD step (lr 0.1)
    moves every weight by -0.1 * (1 + 0.2): after K = 3 steps y = -0.36. Then
    c_i+ = 0.1 - 0.3 + 0.36 / 0.3 = 1, the task's own gradient. The task loss at a step
    is 10 * w (10 parameters): the round reports the mean of 0, -1.2, -2.4."""
    data = TensorExamples(torch.ones(12, 4), torch.zeros(12, dtype=torch.int64), CPU)
    model = nn.Linear(4, 2)
    nn.init.zeros_(model.weight)
    nn.init.zeros_(model.bias)
    controls = ControlVariates(server=filled(model.state_dict(), 0.3), client=filled(model.state_dict(), 0.1))
    config = TrainConfig(lr=0.1, batch_size=4, max_batches=0, scaffold=True)
    outcome = train_round(model, data, config, seed=0, loss=lambda out, target: out.sum() / len(target),
                          controls=controls)
    assert outcome.num_examples == 12
    assert outcome.mean_loss == pytest.approx(-1.2, abs=1e-5)
    assert outcome.client_control is not None
    for name, tensor in outcome.state.items():
        assert torch.allclose(tensor, torch.full_like(tensor, -0.36), atol=1e-6), name
        assert torch.allclose(outcome.client_control[name], torch.ones_like(tensor), atol=1e-5), name


@pytest.mark.parametrize("config", [
    TrainConfig(batch_size=8, max_batches=4, epochs=2, seed=5, scaffold=True),
    TrainConfig(lr=0.05, momentum=0.5, batch_size=16, max_batches=0, seed=5, scaffold=True, proximal_mu=0.5),
])
def test_zero_control_variates_train_bit_for_bit_as_plain_sgd(config: TrainConfig) -> None:
    data = random_digits()
    plain = train_round(fresh_cnn(), data, TrainConfig(**{**config.__dict__, "scaffold": False}), seed=11)
    zeros = zero_controls(fresh_cnn().state_dict())
    corrected = train_round(fresh_cnn(), data, config, seed=11, controls=ControlVariates(zeros, dict(zeros)))
    assert plain.client_control is None
    assert corrected.state.keys() == plain.state.keys()
    for name, tensor in plain.state.items():
        assert torch.equal(corrected.state[name], tensor), name
    assert corrected.mean_loss == plain.mean_loss


def test_a_correction_moves_the_model_and_updates_ci() -> None:
    data = random_digits()
    start = fresh_cnn().state_dict()
    config = TrainConfig(batch_size=8, max_batches=4, seed=5, scaffold=True)
    controls = ControlVariates(filled(start, 0.01), zero_controls(start))
    corrected = train_round(fresh_cnn(), data, config, seed=11, controls=controls)
    plain = train_round(fresh_cnn(), data, config, seed=11, controls=ControlVariates(*[zero_controls(start)] * 2))
    assert not torch.equal(corrected.state["fc1.weight"], plain.state["fc1.weight"])
    # c_i+ = c_i - c + (x - y) / (K lr), checked against the trained model.
    assert corrected.client_control is not None
    for name, tensor in corrected.client_control.items():
        expected = -0.01 + (start[name].double() - corrected.state[name].double()) / (4 * 0.1)
        assert torch.allclose(tensor.double(), expected, atol=1e-6), name


def test_the_payload_is_the_model_then_one_control_per_floating_tensor() -> None:
    model = nn.BatchNorm1d(3)  # weight, bias, running_mean, running_var float; num_batches_tracked int64
    state = model.state_dict()
    control = filled({k: v for k, v in state.items() if v.is_floating_point()}, 0.5)
    joined = join_controls(state, control)
    assert list(joined) == [*state, *(CONTROL_PREFIX + n for n in
                                      ("weight", "bias", "running_mean", "running_var"))]
    model_part, server = split_controls(joined)
    assert list(model_part) == list(state) and list(server) == list(control)
    assert codec.spec_of(joined) == train_spec(state)
    names = [t.name for t in train_spec(state)]
    assert "control/num_batches_tracked" not in names and "control/running_var" in names


def test_a_custom_loop_without_controls_is_told_apart() -> None:
    class Old:
        def train(self, model, data, config, seed, stop=None):
            return None

    class Open:
        def train(self, model, data, config, seed, stop=None, **extra):
            return None

    assert takes_controls(mnist_task())
    assert not takes_controls(Old())
    assert takes_controls(Open())


# The store.


def control_of(value: float) -> Dict[str, torch.Tensor]:
    return {"fc.weight": torch.full((2, 3), value), "fc.bias": torch.full((2,), value)}


def test_a_round_starts_from_the_newest_earlier_round_and_a_rerun_from_the_one_before(tmp_path: Path) -> None:
    store = ControlStore(tmp_path / "state", "tiny")
    like = control_of(0.0)
    assert torch.equal(store.load("run-a", 1, like)["fc.bias"], torch.zeros(2))
    for round_number in (1, 2, 3):
        store.save("run-a", round_number, control_of(float(round_number)))
    # The coordinator is killed during round 4, after this worker saved round 4's c_i.
    store.save("run-a", 4, control_of(4.0))
    rerun = store.load("run-a", 4, like)  # round 4 again, after --resume
    assert torch.equal(rerun["fc.weight"], torch.full((2, 3), 3.0))
    assert torch.equal(store.load("run-a", 5, like)["fc.weight"], torch.full((2, 3), 4.0))
    assert torch.equal(store.load("run-a", 9, like)["fc.weight"], torch.full((2, 3), 4.0))  # rounds skipped
    # The two newest rounds are kept.
    assert sorted(p.name.rsplit("-", 1)[1] for p in (tmp_path / "state").iterdir()) == [
        "3.safetensors", "4.safetensors"]


def test_saving_a_round_again_drops_the_abandoned_later_rounds(tmp_path: Path) -> None:
    store = ControlStore(tmp_path, "tiny")
    for round_number in (5, 6, 7):
        store.save("r", round_number, control_of(float(round_number)))
    store.save("r", 6, control_of(60.0))  # round 6 again: round 7 was of a timeline abandoned
    assert torch.equal(store.load("r", 7, control_of(0.0))["fc.bias"], torch.full((2,), 60.0))
    assert torch.equal(store.load("r", 8, control_of(0.0))["fc.bias"], torch.full((2,), 60.0))
    assert [p.name.rsplit("-", 1)[1] for p in tmp_path.glob("*.safetensors")] == ["6.safetensors"]


def test_the_store_survives_a_restart_and_keeps_runs_apart(tmp_path: Path) -> None:
    ControlStore(tmp_path, "tiny").save("", 2, control_of(2.5))  # "" is a run too
    restarted = ControlStore(tmp_path, "tiny")
    assert torch.equal(restarted.load("", 3, control_of(0.0))["fc.weight"], torch.full((2, 3), 2.5))
    assert torch.equal(restarted.load("other", 3, control_of(0.0))["fc.weight"], torch.zeros(2, 3))
    assert not list(tmp_path.glob("*.partial"))


def test_a_new_run_deletes_the_other_runs_files_and_says_so(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = ControlStore(tmp_path, "tiny")
    store.save("old run", 7, control_of(1.0))
    with caplog.at_level(logging.WARNING, logger="jetfed.scaffold"):
        store.save("new run", 1, control_of(2.0))
    assert "deleted the control variates of other runs" in caplog.text and "'old run' rounds [7]" in caplog.text
    assert torch.equal(store.load("old run", 8, control_of(0.0))["fc.bias"], torch.zeros(2))
    assert len(list(tmp_path.glob("*.safetensors"))) == 1


def test_the_folder_is_made_0700_on_first_use_and_files_are_safetensors(tmp_path: Path) -> None:
    folder = tmp_path / "a" / "b"
    store = ControlStore(folder, "tiny")
    assert not folder.exists()
    path = store.save("r", 1, control_of(1.0))
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700 & ~_umask()
    from safetensors.torch import load_file
    assert torch.equal(load_file(str(path))["fc.bias"], torch.ones(2))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_file_that_is_not_this_runs_control_variate_is_refused_by_name(tmp_path: Path) -> None:
    store = ControlStore(tmp_path, "tiny")
    path = store.save("r", 1, control_of(1.0))
    with pytest.raises(WorkerStateError, match="tensors other than this model's control variate"):
        store.load("r", 2, {"other": torch.zeros(3)})
    with pytest.raises(WorkerStateError, match="not the control variate of run 'r' round 1 of big"):
        ControlStore(tmp_path, "big").load("r", 2, control_of(0.0))
    path.write_bytes(b"garbage")
    with pytest.raises(WorkerStateError) as refused:
        store.load("r", 2, control_of(0.0))
    assert str(refused.value).startswith("--state-dir: ") and str(path) in str(refused.value)
    assert "delete it" in str(refused.value)


def test_a_non_finite_stored_control_is_refused(tmp_path: Path) -> None:
    store = ControlStore(tmp_path, "tiny")
    store.save("r", 1, {"fc.weight": torch.full((2, 3), math.nan), "fc.bias": torch.zeros(2)})
    with pytest.raises(WorkerStateError, match="NaN or Inf"):
        store.load("r", 2, control_of(0.0))


def test_an_unwritable_state_dir_is_refused_at_start_naming_the_flag(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(InvalidConfig, match=r"^--state-dir: .*a-file is a file"):
        state_dir(str(blocker / "state"), "alice")
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(InvalidConfig, match=r"^--state-dir: .* is not writable"):
            state_dir(str(locked / "state"), "alice")
    assert state_dir(str(tmp_path / "new" / "state"), "alice") == tmp_path / "new" / "state"
    assert not (tmp_path / "new").exists()  # checked, created on first use


def test_a_store_that_cannot_write_names_the_flag(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(WorkerStateError, match="^--state-dir: cannot keep SCAFFOLD's control variate"):
        ControlStore(blocker / "state", "tiny").save("r", 1, control_of(1.0))


def test_the_default_state_dir_is_per_worker_under_the_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    assert state_dir(None, "alice") == tmp_path / ".local" / "state" / "jetfed" / "alice"
    with pytest.raises(InvalidConfig, match="^--state-dir: worker name '../x' cannot name a folder"):
        state_dir(None, "../x")


def test_the_workers_default_payload_limit_takes_a_scaffold_round_of_mnist_cnn() -> None:
    """The model's own limit would refuse the doubled payload; the worker's default takes it."""
    import argparse

    from jetfed.service_cli import max_payload_bytes

    state = fresh_cnn().state_dict()
    manifest, _ = codec.encode(join_controls(state, filled(state, 0.5)), "mnist-cnn")
    flags = argparse.Namespace(max_payload_bytes=None)
    assert max_payload_bytes(flags, mnist_task()) < manifest.total_bytes
    assert max_payload_bytes(flags, mnist_task(), spec_of=train_spec) >= manifest.total_bytes


def test_the_flag_is_read() -> None:
    from worker.cli import parse_args

    assert parse_args(["--name", "alice"]).state_dir is None
    assert parse_args(["--name", "alice", "--state-dir", "/x"]).state_dir == "/x"
