"""jetfed.v1.Coordinator during a real run: GetStatus answers mid-run and WatchStatus
follows the run to its end, with the task's named metrics of each scored model, the
same as metrics.jsonl records."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import grpc
import pytest

from coordinator.runner import run
from coordinator.settings import RunSettings
from jetfed.config import TrainConfig
from jetfed.v1 import coordinator_pb2 as pb
from jetfed.v1 import coordinator_pb2_grpc
from tests.conftest import free_port


async def follow(address: str) -> list:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = coordinator_pb2_grpc.CoordinatorStub(channel)
        await channel.channel_ready()
        mid_run = (await stub.GetStatus(pb.GetStatusRequest(), timeout=10)).status
        seen = [mid_run]
        async for message in stub.WatchStatus(pb.WatchStatusRequest(), timeout=120):
            seen.append(message.status)
        return seen


def test_status_follows_a_run(fleet, tmp_path: Path) -> None:
    address = f"127.0.0.1:{free_port()}"
    settings = RunSettings(
        workers={name: p.address for name, p in fleet.workers.items()}, evaluator=fleet.evaluator.address,
        out_dir=tmp_path, rounds=4, eval_every=2, train=TrainConfig(max_batches=2), status_address=address,
    ).validated()

    async def scenario() -> list:
        runner = asyncio.ensure_future(run(settings, say=lambda line: None))
        watcher = asyncio.ensure_future(follow(address))
        await runner
        return await asyncio.wait_for(watcher, 30)

    seen = asyncio.run(scenario())
    assert seen[0].rounds == 4 and seen[0].state in (pb.RUN_STATE_STARTING, pb.RUN_STATE_RUNNING)
    assert [w.name for w in seen[0].workers] == ["alice", "bob", "charlie"]
    assert any(s.state == pb.RUN_STATE_RUNNING and pb.WORKER_STATE_TRAINING in [w.state for w in s.workers] for s in seen)
    last = seen[-1]
    assert last.state == pb.RUN_STATE_FINISHED and last.round == 4
    assert all(w.last_contribution == 4 and w.state == pb.WORKER_STATE_DONE for w in last.workers)
    assert last.last_evaluated_round == 4
    assert {s.model for s in last.last_evaluation} == {"global", "alice", "bob", "charlie"}

    # The evaluator's named metrics reach metrics.jsonl and the status alike.
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    recorded = records[-1]["evaluation"]
    status = {s.model: s for s in last.last_evaluation}
    for model, score in recorded.items():
        metrics = score["metrics"]
        assert set(metrics) == {"loss", "accuracy", *(f"recall/{digit}" for digit in range(10))}, model
        assert metrics["accuracy"] == score["accuracy"] == score["correct"] / 200
        assert all(0.0 <= metrics[f"recall/{digit}"] <= 1.0 for digit in range(10))
        assert dict(status[model].metrics) == metrics
        # The tiny test set holds 20 examples of each digit: accuracy is the mean recall.
        assert sum(metrics[f"recall/{digit}"] for digit in range(10)) / 10 == pytest.approx(metrics["accuracy"])
    assert len({score["metrics"]["recall/4"] for score in recorded.values()}) > 1, "one recall for every model"
    rounds_seen = sorted({s.round for s in seen})
    assert rounds_seen[-1] == 4 and len(rounds_seen) >= 2, "the watch did not follow the run"
