"""image-folder on real processes: tools/mnist_to_imagefolder.py writes the tiny MNIST
out as PNG class folders (alice 0-3, bob 4-6, charlie 7-9, the evaluator's test set),
three workers and an evaluator serve them with --task image-folder, and the real
coordinator runs rounds over them."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, Iterator, List

import grpc
import pytest
import torch

from jetfed import codec, wire
from jetfed.config import TrainConfig
from jetfed.models import build_model
from jetfed.v1 import info_pb2, worker_pb2, worker_pb2_grpc
from tests.integration.processes import (
    START_TIMEOUT_S, WORKERS, Fleet, Process, jetfed_command, start, stop, wait_serving,
)

# make test-all: writing MNIST's PNGs and starting their fleet take ~55 s before the
# first test (CI's 20 minutes); tests/unit/test_image_folder_task.py runs in make test.
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
DIGITS = [str(d) for d in range(10)]
TASK = ["--task", "image-folder", "--model", "mnist-cnn", "--option", "image_size=28", "--option", "channels=1",
        "--option", "mean=0.1307", "--option", "std=0.3081", "--option", f"classes={','.join(DIGITS)}"]


@pytest.fixture(scope="module")
def folders(tiny_mnist: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("image-folders")
    done = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "mnist_to_imagefolder.py"), "--data-dir", str(tiny_mnist),
         "--out", str(out)], capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "alice: 240 PNGs written" in done.stdout and "evaluator: 200 PNGs written" in done.stdout, done.stdout
    return out


def descendants(pid: int) -> List[int]:
    """Every process below `pid` (Linux): a loader's fork server and the processes it forks."""
    found, queue = [], [pid]
    while queue:
        for children in Path(f"/proc/{queue.pop()}/task").glob("*/children"):
            try:
                pids = [int(child) for child in children.read_text().split()]
            except OSError:
                continue
            found += pids
            queue += pids
    return found


@pytest.fixture(scope="module")
def image_fleet(folders: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """Each worker gets only its own folder (no --labels): the folders are the partition.
    charlie decodes in a loader process, so the federation runs both ways, and its
    loader processes must end with it."""
    logs = tmp_path_factory.mktemp("image-fleet-logs")
    common = [*TASK, "--no-download", "--threads", "1"]
    started: List[Process] = []
    below: List[int] = []
    try:
        workers: Dict[str, Process] = {}
        for name in WORKERS:
            loader = ["--option", "loader_workers=1"] if name == "charlie" else []
            workers[name] = start(name, ["worker", "--name", name, "--data-dir", str(folders / name), *common,
                                         *loader], logs)
            started.append(workers[name])
        evaluator = start("testing", ["evaluator", "--name", "testing", "--data-dir", str(folders / "evaluator"),
                                      *common], logs)
        started.append(evaluator)
        deadline = time.monotonic() + START_TIMEOUT_S
        for process in started:
            wait_serving(process, deadline)
        below = descendants(workers["charlie"].popen.pid)
        yield Fleet(workers, evaluator)
    finally:
        codes = stop(started)
    unclean = [f"{p.name} exited {codes[p.name]}:\n{p.output()}" for p in started if codes[p.name] != 0]
    assert not unclean, "unclean shutdown: " + "\n".join(unclean)
    assert len(below) >= 2, below  # the fork server and the loader process, at least
    # Loader processes go within a second; the fork server then tears down the torch it
    # preloaded, which takes seconds, more on a crowded machine.
    deadline = time.monotonic() + 60
    while any(Path(f"/proc/{pid}").exists() for pid in below) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = [pid for pid in below if Path(f"/proc/{pid}").exists()]
    assert not left, f"charlie's loader processes outlived it: {left}"


def test_a_federation_over_png_folders_learns(image_fleet: Fleet, tmp_path: Path) -> None:
    args = ["coordinator", "--evaluator", f"testing={image_fleet.evaluator.address}", "--out", str(tmp_path),
            "--task", "image-folder", "--model", "mnist-cnn", "--rounds", "2", "--eval-every", "1", "--seed", "1", "--connect-timeout", "60"]
    args += [f"--worker={name}={process.address}" for name, process in image_fleet.workers.items()]
    done = subprocess.run(jetfed_command(*args), capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Training round 2/2" in done.stdout
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    accuracy = [record["evaluation"]["global"]["accuracy"] for record in records]
    assert len(accuracy) == 2 and accuracy[-1] > 0.3, accuracy  # chance is 0.1
    assert all(record["evaluation"]["global"]["total"] == 200 for record in records)
    assert "Percentage numbers 0-3:" in done.stdout  # the share lines stay for a classification task


def test_get_info_names_the_task_and_its_classes(image_fleet: Fleet) -> None:
    with grpc.insecure_channel(image_fleet.workers["bob"].address) as channel:
        info = worker_pb2_grpc.WorkerStub(channel).GetInfo(info_pb2.GetInfoRequest(), timeout=10)
    assert (info.task, info.model) == ("image-folder", "mnist-cnn")
    assert list(info.class_names) == DIGITS
    counts = list(info.label_counts)
    assert counts[:4] == [0] * 4 and all(c > 0 for c in counts[4:7]) and counts[7:] == [0] * 3
    assert info.dataset_size == sum(counts)
    assert "image-folder train set on bob: 0: 0," in image_fleet.workers["bob"].output()


def train_all(address: str) -> List[worker_pb2.TrainResponse]:
    """One Train over every example the worker holds (batches=0)."""
    torch.manual_seed(0)
    manifest, payload = codec.encode(build_model("mnist-cnn").state_dict(), "mnist-cnn")
    config = TrainConfig(lr=0.05, batch_size=32, max_batches=0, seed=3)
    header = worker_pb2.TrainHeader(round=1, config=wire.config_to_proto(config),
                                    manifest=wire.manifest_to_proto(manifest))
    messages = wire.weight_messages(worker_pb2.TrainRequest(header=header), payload, 1 << 20,
                                    lambda chunk: worker_pb2.TrainRequest(chunk=chunk))
    with grpc.insecure_channel(address) as channel:
        return list(worker_pb2_grpc.WorkerStub(channel).Train(iter(list(messages)), timeout=60))


def test_a_broken_image_fails_the_round_not_the_worker(image_fleet: Fleet, folders: Path, tmp_path: Path) -> None:
    bob = image_fleet.workers["bob"]
    broken = sorted((folders / "bob" / "train" / "5").iterdir())[3]
    kept = tmp_path / broken.name
    shutil.copy(broken, kept)
    try:
        broken.write_bytes(b"\x89PNG cut short")
        with pytest.raises(grpc.RpcError) as failed:
            train_all(bob.address)
        assert failed.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert str(broken) in failed.value.details() and "replace it or remove it" in failed.value.details()
    finally:
        shutil.copy(kept, broken)
    responses = train_all(bob.address)
    assert responses[0].result.num_examples == sum(1 for _ in (folders / "bob").rglob("*.png"))
    assert bob.popen.poll() is None


def test_a_class_folder_outside_the_list_stops_the_worker_with_one_line(folders: Path, tmp_path: Path) -> None:
    board = tmp_path / "dave"
    shutil.copytree(folders / "alice", board)
    shutil.copytree(board / "train" / "3", board / "train" / "three")
    done = subprocess.run(jetfed_command("worker", "--name", "dave", "--data-dir", str(board), *TASK,
                                         "--no-download", "--threads", "1", "--port", "0"),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    errors = [line for line in done.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "class folders three" in errors[0] and "--option classes" in errors[0], done.stderr
    assert "Traceback" not in done.stderr
