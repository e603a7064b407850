"""`jetfed export` on a run folder laid out by the coordinator's own checkpoint code,
holding an MNIST model trained for a few real batches: the ONNX file, run by
onnxruntime, and the TorchScript file, run by torch.jit.load, give torch's
log-probabilities (within 1e-4) and its classes on 1,000 real test images. --round
exports the checkpoint, and every refusal is one line with no file left behind."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import List, Tuple

import pytest
import torch
from safetensors.torch import load_file

from coordinator import checkpoint
from jetfed import cli
from jetfed.config import TrainConfig
from jetfed.data import LabeledImages, load_mnist
from jetfed.models import build_model
from jetfed.training import DeviceData, train_round

onnx = pytest.importorskip("onnx", reason="the export extra: pip install -r requirements/export.txt")
onnxruntime = pytest.importorskip("onnxruntime", reason="the export extra: pip install -r requirements/export.txt")

MODEL = "mnist-cnn"
TEST_IMAGES = 1000
TOLERANCE = 1e-4


def train(model: torch.nn.Module, data: DeviceData, batches: int, seed: int) -> None:
    """The reference recipe (SGD, lr 0.1, batches of 32) for `batches` batches."""
    train_round(model, data, TrainConfig(max_batches=batches), seed)


@pytest.fixture(scope="module")
def runs(real_mnist: Path, tmp_path_factory: pytest.TempPathFactory) -> Tuple[Path, Path]:
    """A finished run (round 2's model, final and checkpointed) and an unfinished one
    (stopped after round 1: a checkpoint, no final model), written as the coordinator
    writes them."""
    train_set = load_mnist(real_mnist, "train", download=False)
    data = DeviceData.from_images(LabeledImages(train_set.images[:3200], train_set.labels[:3200]), torch.device("cpu"))
    torch.manual_seed(0)
    model = build_model(MODEL)
    root = tmp_path_factory.mktemp("export-runs")
    finished, unfinished = root / "finished", root / "unfinished"
    train(model, data, batches=10, seed=1)
    checkpoint.save(unfinished / "checkpoint", 1, model.state_dict(), MODEL, {}, {"round": 1})
    train(model, data, batches=60, seed=2)
    checkpoint.save(finished / "checkpoint", 2, model.state_dict(), MODEL, {}, {"round": 2})
    checkpoint.write_model(finished / "model.safetensors", model.state_dict(), MODEL, 2)
    return finished, unfinished


@pytest.fixture(scope="module")
def test_images(real_mnist: Path) -> Tuple[torch.Tensor, torch.Tensor]:
    """The first 1,000 test images, normalised as the mnist task feeds them."""
    test_set = load_mnist(real_mnist, "test", download=False)
    data = DeviceData.from_images(LabeledImages(test_set.images[:TEST_IMAGES], test_set.labels[:TEST_IMAGES]),
                                  torch.device("cpu"))
    return data.inputs, data.labels


def torch_log_probs(weights: Path, images: torch.Tensor) -> torch.Tensor:
    """The reference: the registry's model holding the file's weights, run by torch."""
    model = build_model(MODEL)
    model.load_state_dict(load_file(str(weights)))
    with torch.no_grad():
        return model.eval()(images)


def export_process(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jetfed.cli", "export", *args], capture_output=True, text=True,
                          timeout=180)


def export_here(capsys: pytest.CaptureFixture, *args: str) -> Tuple[int, str, List[str]]:
    """The same entry point in this process (torch already loaded): code, stdout, stderr lines."""
    capsys.readouterr()  # what came before (torch's notes on the test's own torch.jit.load) is not the command's
    code = cli.main(["export", *args])
    out, err = capsys.readouterr()
    return code, out, err.splitlines()


def assert_same_predictions(got: torch.Tensor, expected: torch.Tensor, labels: torch.Tensor) -> None:
    assert got.shape == expected.shape == (TEST_IMAGES, 10)
    difference = float((got - expected).abs().max())
    assert difference <= TOLERANCE, f"max |log-prob difference| {difference} over {TEST_IMAGES} test images"
    assert torch.equal(got.argmax(1), expected.argmax(1))
    # A trained model, so agreeing means agreeing on real decisions, not on noise.
    assert float((expected.argmax(1) == labels).float().mean()) > 0.8


def test_onnx_gives_torchs_predictions_on_1000_test_images(
    runs: Tuple[Path, Path], test_images: Tuple[torch.Tensor, torch.Tensor], tmp_path: Path,
) -> None:
    finished, _ = runs
    out = tmp_path / "model.onnx"
    done = export_process(str(finished), "--format", "onnx", "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert f"to {out}: ONNX opset 17" in done.stdout, done.stdout
    assert "input 'input' float32 [batch, 1, 28, 28] -> output 'log_probs' float32 [batch, 10]" in done.stdout
    assert "checked against torch on 256 mnist test examples" in done.stdout, done.stdout
    written = onnx.load(str(out))
    assert [o.version for o in written.opset_import if o.domain in ("", "ai.onnx")] == [17]
    assert [i.name for i in written.graph.input] == ["input"]
    assert [o.name for o in written.graph.output] == ["log_probs"]
    assert written.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    images, labels = test_images
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(["log_probs"], {"input": images.numpy()})[0])
    assert_same_predictions(got, torch_log_probs(finished / "model.safetensors", images), labels)


def test_torchscript_gives_torchs_predictions_on_1000_test_images(
    runs: Tuple[Path, Path], test_images: Tuple[torch.Tensor, torch.Tensor], tmp_path: Path,
) -> None:
    finished, _ = runs
    out = tmp_path / "model.pt"
    done = export_process(str(finished), "--format", "torchscript", "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert "TorchScript (traced)" in done.stdout and "same class for 256/256" in done.stdout, done.stdout
    images, labels = test_images
    loaded = torch.jit.load(str(out))
    with torch.no_grad():
        got = loaded(images)
    assert_same_predictions(got, torch_log_probs(finished / "model.safetensors", images), labels)


def test_round_exports_the_checkpointed_model(
    runs: Tuple[Path, Path], test_images: Tuple[torch.Tensor, torch.Tensor], tmp_path: Path,
    capsys: pytest.CaptureFixture,
) -> None:
    finished, unfinished = runs
    out = tmp_path / "round1.pt"
    code, _, err = export_here(capsys, str(unfinished), "--format", "torchscript", "--out", str(out))
    assert code == 2 and len(err) == 1, err
    assert "model.safetensors does not exist (the run has not finished); --round 1 exports" in err[0]

    code, out_text, err = export_here(capsys, str(unfinished), "--round", "1", "--format", "torchscript",
                                      "--out", str(out))
    assert code == 0, err
    assert f"round 1 of {unfinished}" in out_text
    images, _ = test_images
    with torch.no_grad():
        got = torch.jit.load(str(out))(images)
    round1 = torch_log_probs(unfinished / "checkpoint" / "global-000001.safetensors", images)
    final = torch_log_probs(finished / "model.safetensors", images)
    assert float((got - round1).abs().max()) <= TOLERANCE
    assert float((got - final).abs().max()) > 0.1  # round 1's weights, not the finished run's

    code, _, err = export_here(capsys, str(finished), "--round", "1", "--format", "onnx", "--out", str(out))
    assert code == 2 and len(err) == 1, err
    assert "holds round 2 only" in err[0] and "--round 2" in err[0]


def test_a_missing_run_is_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "model.onnx"
    code, _, err = export_here(capsys, str(tmp_path / "nowhere"), "--format", "onnx", "--out", str(out))
    assert code == 2
    assert err == [
        f"jetfed export: {tmp_path / 'nowhere'} does not exist; RUN_DIR is a coordinator's --out folder "
        "(or a .safetensors file)"
    ]
    assert not out.exists()


@pytest.mark.parametrize("flags, says", [
    (["--model", "resnet18"], "holds model 'mnist-cnn' (its metadata) but --model builds 'resnet18'"),
    (["--task", "image-folder", "--option", "classes=cat,dog", "--option", "channels=1", "--option", "image_size=28"],
     "does not fit task image-folder's model mnist-cnn (got: the file, expected: the model): "
     "manifest.tensors['fc2.bias']: got F32[10], expected F32[2]"),
    (["--task", "no-such-task"], "--task: no task 'no-such-task' is installed"),
])
def test_weights_that_do_not_fit_are_one_line_naming_both_sides(
    runs: Tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture, flags: List[str], says: str,
) -> None:
    finished, _ = runs
    out = tmp_path / "model.onnx"
    code, _, err = export_here(capsys, str(finished), "--format", "onnx", "--out", str(out), *flags)
    assert code == 2 and len(err) == 1 and says in err[0], err
    assert not out.exists() and not list(tmp_path.iterdir())


def test_an_unknown_format_is_one_line_and_exit_2(runs: Tuple[Path, Path], tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as stopped:
        cli.main(["export", str(runs[0]), "--format", "tflite", "--out", str(tmp_path / "m.tflite")])
    assert stopped.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "invalid choice: 'tflite' (choose from 'onnx', 'torchscript')" in err[0], err


def test_a_checkpoint_that_fails_its_sha256_is_refused(runs: Tuple[Path, Path], tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    _, unfinished = runs
    broken = tmp_path / "run"
    (broken / "checkpoint").mkdir(parents=True)
    for source in (unfinished / "checkpoint").iterdir():
        (broken / "checkpoint" / source.name).write_bytes(source.read_bytes())
    model_file = broken / "checkpoint" / "global-000001.safetensors"
    data = bytearray(model_file.read_bytes())
    data[-1] ^= 0x01
    model_file.write_bytes(bytes(data))
    out = tmp_path / "model.onnx"
    code, _, err = export_here(capsys, str(broken), "--round", "1", "--format", "onnx", "--out", str(out))
    assert code == 2 and len(err) == 1, err
    assert f"checkpoint {model_file}: sha256 " in err[0] and "does not match" in err[0]
    assert not out.exists()


def test_an_export_that_disagrees_with_torch_is_refused_and_not_kept(
    runs: Tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture,
) -> None:
    """--tolerance 0: onnxruntime's kernels round differently from torch's (by ~1e-7),
    which is then a disagreement; an earlier good export at --out stays as it was."""
    finished, _ = runs
    out = tmp_path / "model.onnx"
    out.write_bytes(b"an earlier export")
    code, _, err = export_here(capsys, str(finished), "--format", "onnx", "--out", str(out), "--tolerance", "0")
    assert code == 1 and len(err) == 1, err
    assert "refused: the onnx model differs from torch by" in err[0] and f"{out} is left as it was" in err[0], err
    assert out.read_bytes() == b"an earlier export"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_without_test_examples_the_check_runs_random_inputs(runs: Tuple[Path, Path], tmp_path: Path,
                                                            capsys: pytest.CaptureFixture) -> None:
    finished, _ = runs
    empty = tmp_path / "no-data"
    empty.mkdir()
    out = tmp_path / "model.pt"
    code, text, err = export_here(capsys, str(finished), "--format", "torchscript", "--out", str(out),
                                  "--data-dir", str(empty), "--check-examples", "70")
    assert code == 0, err
    assert f"checked against torch on 70 random inputs (no mnist test examples in {empty}; --data-dir names them)" \
        in text, text
    assert out.is_file()
