"""SCAFFOLD on real `jetfed worker` processes over gRPC: a Train that carries the
server's control variate is taken at the default payload limit and leaves this
worker's c_i in --state-dir; weights and config that disagree are refused; a worker
restarted trains its next round from the c_i it kept, and a round run again (its
coordinator resumed) from the round before it. A state dir it cannot write stops the
worker at start; a custom task whose loop takes no controls trains uncorrected."""

from __future__ import annotations

import asyncio
import dataclasses
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, Tuple

import grpc
import pytest
import torch

from jetfed import codec, serving, wire
from jetfed.codec import StateDict
from jetfed.config import TrainConfig
from jetfed.data import load_mnist, parse_labels
from jetfed.models import build_model
from jetfed.scaffold import CONTROL_PREFIX, ControlStore, join_controls
from jetfed.serving import CHANNEL_OPTIONS
from jetfed.tasks.mnist import MnistTask
from jetfed.training import DeviceData
from jetfed.v1 import worker_pb2, worker_pb2_grpc
from tests.integration.processes import START_TIMEOUT_S, Process, jetfed_command, start, stop, wait_serving
from tests.integration.services import CPU, HOST, mnist_task
from worker.service import WorkerService

RUN = "scaffold-test-run"
CONFIG = TrainConfig(lr=0.1, batch_size=16, max_batches=3, seed=7, scaffold=True)


def global_model() -> StateDict:
    torch.manual_seed(0)
    return build_model("mnist-cnn").state_dict()


def server_control() -> StateDict:
    """A c far from zero, so a c_i learnt from it changes the next round visibly."""
    generator = torch.Generator().manual_seed(1)
    return {name: torch.randn(t.shape, generator=generator) * 0.05 for name, t in global_model().items()}


def train_messages(state: StateDict, config: TrainConfig, round_number: int) -> List[worker_pb2.TrainRequest]:
    manifest, payload = codec.encode(state, "mnist-cnn")
    header = worker_pb2.TrainHeader(round=round_number, config=wire.config_to_proto(config),
                                    manifest=wire.manifest_to_proto(manifest), run_id=RUN)
    return list(wire.weight_messages(worker_pb2.TrainRequest(header=header), payload, 256 << 10,
                                     lambda c: worker_pb2.TrainRequest(chunk=c)))


async def train(address: str, state: StateDict, config: TrainConfig, round_number: int) -> Tuple[str, StateDict]:
    """One Train call: the result's manifest tensor names and the trained weights."""
    async with grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        stub = worker_pb2_grpc.WorkerStub(channel)
        replies = [r async for r in stub.Train(iter(train_messages(state, config, round_number)), timeout=60)]
    manifest = wire.manifest_from_proto(replies[0].result.manifest)
    payload = b"".join(r.chunk.data for r in replies[1:])
    return ",".join(t.name for t in manifest.tensors), codec.decode(manifest, payload)


def scaffold_round(process: Process, round_number: int) -> StateDict:
    names, trained = asyncio.run(train(process.address, join_controls(global_model(), server_control()), CONFIG, round_number))
    assert CONTROL_PREFIX not in names  # the result is the trained model only
    return trained


def refusal(process: Process, state: StateDict, config: TrainConfig) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        asyncio.run(train(process.address, state, config, 1))
    return refused.value


def start_workers(logs: Path, folders: Dict[str, Path], tiny_mnist: Path) -> List[Process]:
    """Workers all named alice (so they shuffle alike), one per state folder."""
    common = ["--name", "alice", "--labels", "0-3", "--data-dir", str(tiny_mnist), "--no-download", "--threads", "1"]
    processes = [start(label, ["worker", *common, "--state-dir", str(folder)], logs) for label, folder in folders.items()]
    deadline = time.monotonic() + START_TIMEOUT_S
    for process in processes:
        wait_serving(process, deadline)
    return processes


def stopped(processes: List[Process]) -> None:
    codes = stop(processes)
    assert set(codes.values()) == {0}, "\n".join(p.output() for p in processes)


def same(first: StateDict, second: StateDict) -> bool:
    return first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_scaffold_rounds_on_a_real_worker_keep_ci_across_a_restart(tiny_mnist: Path, tmp_path: Path) -> None:
    kept, fresh_folder = tmp_path / "alice-state", tmp_path / "fresh-state"
    alice, fresh = start_workers(tmp_path, {"alice": kept, "fresh": fresh_folder}, tiny_mnist)
    try:
        round_1 = scaffold_round(alice, 1)
        files = sorted(p.name for p in kept.iterdir())
        assert len(files) == 1 and files[0].endswith("-1.safetensors"), files

        missing = refusal(alice, global_model(), CONFIG)
        assert missing.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "config.scaffold: the weights hold no control/ tensors" in missing.details()
        unasked = refusal(alice, join_controls(global_model(), server_control()), TrainConfig(seed=7))
        assert unasked.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "come only with config.scaffold" in unasked.details()
        partial = join_controls(global_model(), server_control())
        del partial["control/fc2.bias"]
        short = refusal(alice, partial, CONFIG)
        assert short.code() == grpc.StatusCode.FAILED_PRECONDITION and "'control/fc2.bias'" in short.details()
        assert sorted(p.name for p in kept.iterdir()) == files  # refusals keep nothing
    finally:
        stopped([alice])

    (alice,) = start_workers(tmp_path, {"alice-again": kept}, tiny_mnist)
    try:
        restarted_round_2 = scaffold_round(alice, 2)  # from round 1's c_i, kept on disk
        fresh_round_2 = scaffold_round(fresh, 2)  # from zeros
        again_round_1 = scaffold_round(alice, 1)  # round 1 run again: from zeros, not from round 1's own c_i
    finally:
        stopped([alice, fresh])
    assert not same(restarted_round_2, fresh_round_2)
    assert same(again_round_1, round_1)
    assert "control variate of round 1" in alice.output()


def test_the_worker_exits_at_start_on_an_unwritable_state_dir(tmp_path: Path) -> None:
    """One line naming the flag, exit 2, before any data is read (there is none here)."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    done = subprocess.run(
        jetfed_command("worker", "--name", "alice", "--state-dir", str(blocker / "s"),
                       "--data-dir", str(tmp_path / "no-data"), "--no-download", "--port", "0"),
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert "--state-dir: " in done.stderr and "a-file is a file" in done.stderr
    assert "Traceback" not in done.stderr


class OwnLoop(MnistTask):
    """A custom task whose training loop predates SCAFFOLD: no `controls` parameter."""

    def train(self, model, data, config, seed, stop=None):  # type: ignore[override]
        return super().train(model, data, config, seed, stop)


def test_a_task_whose_own_loop_takes_no_controls_trains_a_scaffold_round_uncorrected(
    tiny_mnist: Path, tmp_path: Path,
) -> None:
    images = load_mnist(tiny_mnist, "train", download=False).subset(parse_labels("0-3"))
    task = OwnLoop(mnist_task().settings)
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="torch")
    service = WorkerService("alice", task, DeviceData.from_images(images, CPU), device_label="cpu", executor=executor,
                            chunk_bytes=256 << 10, max_payload_bytes=16 << 20,
                            control_store=ControlStore(tmp_path / "state", task.model_name))
    name = worker_pb2.DESCRIPTOR.services_by_name["Worker"].full_name

    async def scenario() -> Tuple[StateDict, StateDict]:
        running = await serving.start_server(
            [serving.Service(name, lambda server: worker_pb2_grpc.add_WorkerServicer_to_server(service, server))],
            HOST, 0,
        )
        address = f"{HOST}:{running.port}"
        try:
            _, corrected = await train(address, join_controls(global_model(), server_control()), CONFIG, 1)
            _, plain = await train(address, global_model(), dataclasses.replace(CONFIG, scaffold=False), 1)
            return corrected, plain
        finally:
            await running.stop(0)
            executor.shutdown()

    corrected, plain = asyncio.run(scenario())
    assert same(corrected, plain)
    assert not (tmp_path / "state").exists()
