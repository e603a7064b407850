"""Two coordinators must not drive the same workers: real `jetfed` coordinator and worker
processes. A second run is refused, naming both runs, while the first goes on untouched;
a run that ends gracefully frees its workers at once (EndRun); a run resumed after a
SIGKILL keeps its id, so its workers serve it as before.

The workers are this module's own, never the session's shared fleet: a refused or held
worker must not disturb other modules' runs."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Iterator, List

import pytest
import torch

from coordinator.clients import Weights, WorkerClient
from coordinator.failures import Failure
from jetfed import codec
from jetfed.config import TrainConfig
from jetfed.models import build_model
from tests.integration.processes import START_TIMEOUT_S, Process, jetfed_command, start, stop, wait_serving

RUN = re.compile(r"coordinator\.runner: run=([0-9a-f]{16}) ")
SMALL = TrainConfig(batch_size=16, max_batches=1)
# Fast rounds (about 0.15 s each with one batch), so the hold after a run's last Train
# is well under a second: the tests read the worker's log, not the clock, to tell an
# EndRun release from a hold that ran out.
ROUND_FLAGS = ["--batches", "1", "--connect-timeout", "30", "--max-backoff", "1"]


@pytest.fixture(scope="module")
def worker(tiny_mnist: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Process]:
    process = start("alice", ["worker", "--name", "alice", "--labels", "all", "--data-dir", str(tiny_mnist),
                              "--no-download", "--threads", "1"], tmp_path_factory.mktemp("two-coordinators"))
    try:
        wait_serving(process, time.monotonic() + START_TIMEOUT_S)
        yield process
    finally:
        codes = stop([process])
    assert codes[process.name] == 0, process.output()


class Coordinator:
    """A coordinator process whose output (stdout and logs) goes to a file, never a
    pipe: a pipe nobody reads while another coordinator runs would fill, stall this one
    and let its hold on the workers lapse."""

    def __init__(self, worker: Process, out: Path, rounds: int, *extra: str) -> None:
        self.log = out.with_name(out.name + ".log")
        args = ["coordinator", "--out", str(out), "--rounds", str(rounds), *ROUND_FLAGS, *extra,
                f"--worker=alice={worker.address}"]
        with self.log.open("ab") as handle:
            self.popen = subprocess.Popen(jetfed_command(*args), stdout=handle, stderr=subprocess.STDOUT)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, text: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.output():
            if self.popen.poll() is not None:
                pytest.fail(f"the coordinator exited {self.popen.returncode} before {text!r}:\n{self.output()}")
            if time.monotonic() > deadline:
                pytest.fail(f"no {text!r} within {timeout:.0f}s:\n{self.output()}")
            time.sleep(0.05)

    def finish(self, timeout: float = 120) -> int:
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            pytest.fail(f"the coordinator still ran after {timeout:.0f}s:\n{self.output()}")

    def run_ids(self) -> List[str]:
        """The run id it logged at each start (a resumed run appends to the same log)."""
        return RUN.findall(self.output())


def rounds(out: Path) -> List[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_a_second_coordinator_is_refused_and_the_first_goes_on(worker: Process, tmp_path: Path) -> None:
    """B is started while A runs: B fails naming both runs, A's rounds go on untouched.
    A then stops gracefully (SIGTERM: its rounds are many, so it is surely still going
    when B has failed), which frees the worker at once: a third run trains on it."""
    first = Coordinator(worker, tmp_path / "a", 100_000)
    try:
        first.wait_for("Training round 2/")
        second = Coordinator(worker, tmp_path / "b", 3)
        assert second.finish() != 0, second.output()
        done = len(rounds(tmp_path / "a"))
        first.wait_for(f"Training round {done + 2}/")
    finally:
        first.popen.send_signal(signal.SIGTERM)
    assert first.finish() == 0, first.output()
    [a], [b] = first.run_ids(), second.run_ids()
    assert a != b
    errors = [line for line in second.output().splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "Traceback" not in second.output(), second.output()
    assert "another coordinator is driving these workers" in errors[0], errors[0]
    assert "two coordinators are driving worker alice" in errors[0] and a in errors[0] and b in errors[0], errors[0]
    records = rounds(tmp_path / "a")
    assert [r["round"] for r in records] == list(range(1, len(records) + 1))
    assert all(r["workers"] == ["alice"] and r["failed"] == {} for r in records), "B disturbed A's rounds"
    assert f"run={a} ended; workers freed: alice" in first.output()
    assert f"released run={a}: its coordinator ended it" in worker.output()

    third = Coordinator(worker, tmp_path / "c", 3)
    assert third.finish() == 0, third.output()
    [c] = third.run_ids()
    assert [r["round"] for r in rounds(tmp_path / "c")] == [1, 2, 3]
    assert all(r["failed"] == {} for r in rounds(tmp_path / "c")), "the third run was refused before it trained"
    assert re.search(rf"serving run={c} peer=\S+ previous_run=-$", worker.output(), re.M), worker.output()
    assert f"released run={c}: its coordinator ended it" in worker.output()


def test_end_run_frees_the_worker_before_the_hold_runs_out(worker: Process) -> None:
    """With the real client: a run training every 2 s holds the worker for 4 s after its
    last Train; its EndRun lets another run in at once. Another run's id, or none, frees
    nothing, and an id too long is refused by name."""
    spec = codec.spec_of(build_model("mnist-cnn").state_dict())
    torch.manual_seed(0)
    weights = Weights.of(build_model("mnist-cnn").state_dict(), "mnist-cnn")

    def client(run_id: str) -> WorkerClient:
        made = WorkerClient("alice", worker.address, 64 << 10, run_id=run_id)
        made.expect("mnist-cnn", spec, 8 << 20)
        return made

    async def scenario() -> None:
        first, second, stranger = client("run-slow"), client("run-next"), client("x" * 129)
        try:
            await first.train(1, SMALL, weights, timeout=30)
            await asyncio.sleep(2.0)
            await first.train(2, SMALL, weights, timeout=30)
            ended = time.monotonic()
            with pytest.raises(Failure) as refused:
                await second.train(1, SMALL, weights, timeout=30)
            assert not await second.end_run(timeout=5), "another run's EndRun freed the worker"
            with pytest.raises(Failure) as too_long:
                await stranger.end_run(timeout=5)
            assert await first.end_run(timeout=5)
            await second.train(1, SMALL, weights, timeout=30)
            assert time.monotonic() - ended < 4.0, "the hold ran out before EndRun was tested"
            assert await second.end_run(timeout=5)
        finally:
            for each in (first, second, stranger):
                await each.close()
        assert refused.value.status == "FAILED_PRECONDITION"
        assert too_long.value.status == "INVALID_ARGUMENT"
        assert too_long.value.detail == "run_id: 129 characters, at most 128"

    asyncio.run(asyncio.wait_for(scenario(), 60))
    assert "end of run=run-next ignored: serving run=run-slow" in worker.output()
    assert "released run=run-slow: its coordinator ended it" in worker.output()


def test_a_run_resumed_after_sigkill_keeps_its_id(worker: Process, tmp_path: Path) -> None:
    out = tmp_path / "run"
    killed = Coordinator(worker, out, 20)
    killed.wait_for("Training round 4/")
    killed.popen.send_signal(signal.SIGKILL)
    killed.popen.wait()
    [run_id] = killed.run_ids()
    saved = json.loads((out / "checkpoint" / "state.json").read_text())
    assert saved["run_id"] == run_id and "run_id" not in saved["run"]

    resumed = Coordinator(worker, out, 20, "--resume")
    assert resumed.finish() == 0, resumed.output()
    assert resumed.run_ids() == [run_id, run_id]
    assert "Resuming after round" in resumed.output()
    records = rounds(out)
    assert [r["round"] for r in records] == list(range(1, 21))
    assert not any("FAILED_PRECONDITION" in reason for r in records for reason in r["failed"].values()), records
    assert json.loads((out / "checkpoint" / "state.json").read_text())["run_id"] == run_id
    assert worker.output().count(f"serving run={run_id} ") == 1, "the worker saw the resumed run as another run"
    assert f"released run={run_id}: its coordinator ended it" in worker.output()
