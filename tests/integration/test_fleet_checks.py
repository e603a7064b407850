"""The fleet is checked at connect, on real processes: a worker on another task, with
another class list or another architecture, and an evaluator on another task, are each
refused before any weights move, with both sides named. The first weights come from a
worker (Worker.InitialWeights: exactly the model the coordinator used to build) or from
--init-weights, made as the README shows."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, Iterator, List

import grpc
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from coordinator.clients import WorkerClient
from coordinator.federation import RunFailed
from coordinator.runner import run
from coordinator.settings import RunSettings
from jetfed import codec
from jetfed.config import TrainConfig
from jetfed.models import build_model
from jetfed.v1 import info_pb2, worker_pb2, worker_pb2_grpc
from tests.integration.processes import START_TIMEOUT_S, Fleet, Process, jetfed_command, start, stop, wait_serving

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "fleet-checks-token-0123456789"
AS_MNIST = ["--task", "image-folder", "--model", "mnist-cnn", "--option", "image_size=28", "--option", "channels=1"]
DIGITS = [str(d) for d in range(10)]


def write_pngs(folder: Path, classes: List[str], per_class: int = 2) -> Path:
    """A few 28x28 grayscale PNGs in one folder per class, as a camera pipeline leaves them."""
    generator = torch.Generator().manual_seed(len(classes))
    for name in classes:
        (folder / name).mkdir(parents=True)
        for index in range(per_class):
            pixels = torch.randint(0, 256, (28, 28), generator=generator, dtype=torch.uint8)
            Image.fromarray(pixels.numpy(), mode="L").save(folder / name / f"{index:03d}.png")
    return folder


@pytest.fixture(scope="module")
def odd_workers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dict[str, Process]]:
    """Workers that do not fit the mnist fleet, nor each other: dave runs image-folder
    (mnist-cnn at 28 px, classes 0-9), erin the same with the classes 0-4, frank the same
    as dave at 32 px (another architecture) and guarded by a token."""
    folders = tmp_path_factory.mktemp("png-folders")
    digits = write_pngs(folders / "digits", DIGITS)
    five = write_pngs(folders / "five", DIGITS[:5])
    token = folders / "token"
    token.write_text(TOKEN)
    logs = tmp_path_factory.mktemp("odd-worker-logs")
    common = ["worker", "--no-download", "--threads", "1", "--labels", "all"]
    flags = {
        "dave": ["--data-dir", str(digits), *AS_MNIST],
        "erin": ["--data-dir", str(five), *AS_MNIST, "--option", "classes=0,1,2,3,4"],
        "frank": ["--data-dir", str(digits), *AS_MNIST, "--option", "image_size=32", "--token-file", str(token)],
    }
    started: List[Process] = []
    try:
        for name, extra in flags.items():
            started.append(start(name, [*common, "--name", name, *extra], logs))
        deadline = time.monotonic() + START_TIMEOUT_S
        for process in started:
            wait_serving(process, deadline)
        yield {process.name: process for process in started}
    finally:
        stop(started)


def info(process: Process) -> info_pb2.GetInfoResponse:
    with grpc.insecure_channel(process.address) as channel:
        return worker_pb2_grpc.WorkerStub(channel).GetInfo(info_pb2.GetInfoRequest(), timeout=30)


def settings(out: Path, workers: Dict[str, Process], evaluator: Process = None, **changes: object) -> RunSettings:
    values = dict(
        workers={name: process.address for name, process in workers.items()},
        evaluator=evaluator.address if evaluator else None, out_dir=out, rounds=1, eval_every=10,
        train=TrainConfig(lr=0.1, batch_size=8, max_batches=1, seed=1), round_timeout=120.0, eval_timeout=60.0,
        connect_timeout=30.0, min_workers=len(workers),
    )
    values.update(changes)
    return RunSettings(**values).validated()  # type: ignore[arg-type]


def refused(run_settings: RunSettings) -> str:
    """The run's refusal at connect: no round trained, none recorded."""
    lines: List[str] = []
    metrics = run_settings.out_dir / "metrics.jsonl"
    before = metrics.read_text() if metrics.exists() else ""
    with pytest.raises(RunFailed) as caught:
        asyncio.run(run(run_settings, say=lines.append))
    assert not any(line.startswith("Training round") for line in lines), lines
    assert metrics.read_text() == before
    return str(caught.value)


def test_a_worker_on_another_task_is_refused_at_connect(fleet: Fleet, odd_workers: Dict[str, Process],
                                                        tmp_path: Path) -> None:
    """Through the real CLI: one error line naming both sides, exit status 1."""
    args = ["coordinator", "--out", str(tmp_path), "--rounds", "1", "--connect-timeout", "30",
            f"--evaluator=testing={fleet.evaluator.address}",
            *[f"--worker={name}={fleet.workers[name].address}" for name in ("alice", "bob")],
            f"--worker=dave={odd_workers['dave'].address}"]
    done = subprocess.run(jetfed_command(*args), capture_output=True, text=True, timeout=180)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1, done.stderr
    assert ("worker dave runs task 'image-folder', this run and worker alice run 'mnist': start dave with "
            "--task mnist") in errors[0]
    assert "Training round" not in done.stdout
    assert not (tmp_path / "checkpoint").exists()


def test_another_class_list_is_refused_at_connect(odd_workers: Dict[str, Process], tmp_path: Path) -> None:
    workers = {name: odd_workers[name] for name in ("dave", "erin")}
    problem = refused(settings(tmp_path, workers, task="image-folder"))
    assert ("worker erin's classes [0, 1, 2, 3, 4] differ from dave's [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]: give every "
            "board the same class list (image-folder: the same --option classes=...)") in problem


def test_another_architecture_is_refused_at_connect(odd_workers: Dict[str, Process], tmp_path: Path) -> None:
    dave, frank = info(odd_workers["dave"]), info(odd_workers["frank"])
    assert dave.model == frank.model == "mnist-cnn" and dave.model_digest != frank.model_digest
    workers = {name: odd_workers[name] for name in ("dave", "frank")}
    problem = refused(settings(tmp_path, workers, task="image-folder"))
    assert (f"worker frank's model mnist-cnn has another architecture (digest {frank.model_digest[:12]} vs "
            f"{dave.model_digest[:12]}) than dave's: the same --model and options (image_size, channels) on every "
            "board") in problem


def test_an_evaluator_on_another_task_is_refused_at_connect(fleet: Fleet, odd_workers: Dict[str, Process],
                                                           tmp_path: Path) -> None:
    problem = refused(settings(tmp_path, {"dave": odd_workers["dave"]}, fleet.evaluator, task="image-folder"))
    assert ("the evaluator runs task 'mnist', this run and worker dave run 'image-folder': start the evaluator "
            "with --task image-folder") in problem


def test_a_model_the_fleet_does_not_serve_is_refused(fleet: Fleet, tmp_path: Path) -> None:
    problem = refused(settings(tmp_path, {"alice": fleet.workers["alice"]}, model="resnet18"))
    assert "worker alice runs model 'mnist-cnn', this run trains 'resnet18' (--model)" in problem


def test_a_resumed_run_meets_the_checkpoints_architecture(odd_workers: Dict[str, Process], tmp_path: Path) -> None:
    """A round on dave, then a resume on frank (same task and model name, 32 px)."""
    first = settings(tmp_path, {"dave": odd_workers["dave"]}, task="image-folder")
    asyncio.run(run(first, say=lambda line: None))
    resumed = settings(tmp_path, {"frank": odd_workers["frank"]}, task="image-folder", rounds=2, resume=True)
    problem = refused(resumed)
    checkpoint = load_file(str(next((tmp_path / "checkpoint").glob("global-*.safetensors"))))
    assert problem == (
        f"the checkpoint of round 1 holds other tensors (digest {digest_of(checkpoint)[:12]}) than the fleet's model "
        f"mnist-cnn (digest {info(odd_workers['frank']).model_digest[:12]}, worker frank): start the boards with the "
        "--model and options of the run being resumed")


def digest_of(state: Dict[str, torch.Tensor]) -> str:
    return codec.spec_digest(codec.spec_of(state))


def test_initial_weights_are_the_model_the_coordinator_built_before(fleet: Fleet) -> None:
    """`torch.manual_seed(seed); build_model("mnist-cnn")`, to the byte: the reference
    run starts where it always did."""
    alice = info(fleet.workers["alice"])

    async def ask(seed: int):
        client = WorkerClient("alice", fleet.workers["alice"].address, 1 << 20)
        try:
            return await client.initial_weights(seed, "mnist-cnn", alice.model_digest, 8 << 20, 60.0)
        finally:
            await client.close()

    for seed in (1, 2):
        torch.manual_seed(seed)
        _, expected = codec.encode(build_model("mnist-cnn").state_dict(), "mnist-cnn")
        weights = asyncio.run(ask(seed))
        assert weights.payload == expected, seed
        assert digest_of(weights.state) == alice.model_digest


def test_initial_weights_are_for_the_coordinator_only(odd_workers: Dict[str, Process]) -> None:
    """Guarded like Train; GetInfo stays open."""
    frank = odd_workers["frank"]
    with grpc.insecure_channel(frank.address) as channel:
        stub = worker_pb2_grpc.WorkerStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            list(stub.InitialWeights(worker_pb2.InitialWeightsRequest(seed=1), timeout=30))
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        replies = list(stub.InitialWeights(worker_pb2.InitialWeightsRequest(seed=1), timeout=30,
                                           metadata=(("authorization", f"Bearer {TOKEN}"),)))
    assert replies[0].WhichOneof("kind") == "header" and replies[1].WhichOneof("kind") == "chunk"
    assert replies[0].header.manifest.model == "mnist-cnn"


def test_init_weights_of_another_model_are_refused_naming_the_file(fleet: Fleet, tmp_path: Path) -> None:
    path = tmp_path / "five-classes.safetensors"
    save_file(build_model("mnist-cnn", num_classes=5).state_dict(), str(path))
    problem = refused(settings(tmp_path / "run", {"alice": fleet.workers["alice"]}, init_weights=path))
    assert problem.startswith(f"--init-weights {path} holds other tensors (digest ")
    assert f"than the fleet's model mnist-cnn (digest {info(fleet.workers['alice']).model_digest[:12]}, " \
           "worker alice)" in problem


def readme_recipe() -> str:
    """The README's recipe for --init-weights, as a user copies it."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("### Initial weights"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.slow
def test_the_readme_recipe_makes_init_weights_a_fleet_takes(tmp_path: Path) -> None:
    """The recipe run as written (except that the test machine downloads nothing:
    torchvision's weights are random here), then a resnet18 image-folder worker trains a
    round from the file."""
    recipe = readme_recipe()
    assert 'weights="IMAGENET1K_V1"' in recipe
    script = recipe.replace('weights="IMAGENET1K_V1"', "weights=None") + (
        "assert all(torch.equal(model.net.state_dict()[k], v) for k, v in pretrained.items() if k not in head)\n"
    )
    done = subprocess.run([sys.executable, "-c", "import torch\n" + script], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    made = load_file(str(tmp_path / "init.safetensors"))
    assert all(name.startswith("net.") for name in made), sorted(made)[:5]
    logs = tmp_path / "logs"
    logs.mkdir()
    folder = write_pngs(tmp_path / "photos", DIGITS)
    # resnet18's tensors do not depend on the image size: 32 px keeps the round cheap.
    grace = start("grace", ["worker", "--name", "grace", "--labels", "all", "--no-download", "--threads", "1",
                            "--data-dir", str(folder), "--task", "image-folder", "--model", "resnet18",
                            "--option", "image_size=32"], logs)
    try:
        wait_serving(grace, time.monotonic() + START_TIMEOUT_S)
        assert info(grace).model_digest == digest_of(made)
        lines: List[str] = []
        run_settings = settings(tmp_path / "run", {"grace": grace}, task="image-folder", model="resnet18",
                                init_weights=tmp_path / "init.safetensors")
        summary = asyncio.run(run(run_settings, say=lines.append))
    finally:
        stop([grace])
    assert summary.rounds == 1
    start_line = next(line for line in lines if line.startswith("Running "))
    assert start_line == (f"Running task image-folder, model resnet18 (10 classes, digest {digest_of(made)[:12]}); "
                          f"initial weights: --init-weights {tmp_path / 'init.safetensors'}")
