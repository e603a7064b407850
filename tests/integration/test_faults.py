"""Faults broken for real: processes killed, stopped and restarted on real ports while a
real coordinator process runs its rounds."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path
from typing import Dict, Iterator, List

import pytest
from safetensors.torch import load_file

from tests.conftest import free_port
from tests.integration.processes import (
    HOST, START_TIMEOUT_S, WORKERS, Process, jetfed_command, stop, wait_serving,
)


def start_worker(name: str, data: Path, logs: Path, port: int) -> Process:
    log = logs / f"{name}-{port}-{time.monotonic_ns()}.log"
    with log.open("wb") as handle:
        popen = subprocess.Popen(
            jetfed_command("worker", "--name", name, "--labels", WORKERS[name], "--data-dir", str(data),
                           "--no-download", "--threads", "1", "--host", HOST, "--port", str(port)),
            stdout=handle, stderr=subprocess.STDOUT,
        )
    return Process(name, f"{HOST}:{port}", popen, log)


@pytest.fixture
def workers(tiny_mnist: Path, tmp_path: Path) -> Iterator[Dict[str, Process]]:
    started = {name: start_worker(name, tiny_mnist, tmp_path, free_port()) for name in WORKERS}
    deadline = time.monotonic() + START_TIMEOUT_S
    for process in started.values():
        wait_serving(process, deadline)
    yield started
    stop(list(started.values()))


def coordinator(workers: Dict[str, Process], out: Path, *extra: str) -> subprocess.Popen:
    args = ["coordinator", "--out", str(out), "--connect-timeout", "5", "--max-backoff", "1", *extra]
    args += [f"--worker={name}={process.address}" for name, process in workers.items()]
    return subprocess.Popen(jetfed_command(*args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def read_until(proc: subprocess.Popen, prefix: str, timeout: float = 120) -> List[str]:
    lines, deadline = [], time.monotonic() + timeout
    for line in proc.stdout:
        lines.append(line)
        if line.startswith(prefix) or time.monotonic() > deadline:
            return lines
    pytest.fail(f"coordinator ended before {prefix!r}:\n{''.join(lines)}")


def finish(proc: subprocess.Popen) -> str:
    output, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, output
    return output


def metrics(out: Path) -> List[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_killed_worker_is_survived_and_contributes_after_restart(workers, tiny_mnist, tmp_path):
    """bob dies by SIGKILL mid-run; the rounds go on with the quorum. The coordinator is
    paused (SIGSTOP) while bob boots, only so the run cannot end before bob is back;
    nobody tells the coordinator anything."""
    out = tmp_path / "run"
    proc = coordinator(workers, out, "--rounds", "30", "--batches", "2", "--min-workers", "2", "--round-timeout", "20")
    read_until(proc, "Training round 3/")
    bob = workers["bob"]
    bob.popen.send_signal(signal.SIGKILL)
    bob.popen.wait()
    read_until(proc, "Training round 8/")
    proc.send_signal(signal.SIGSTOP)
    try:
        workers["bob"] = start_worker("bob", tiny_mnist, tmp_path, int(bob.address.rsplit(":", 1)[1]))
        wait_serving(workers["bob"], time.monotonic() + START_TIMEOUT_S)
    finally:
        proc.send_signal(signal.SIGCONT)
    finish(proc)
    records = metrics(out)
    assert [r["round"] for r in records] == list(range(1, 31))
    without_bob = [r["round"] for r in records if "bob" not in r["workers"]]
    assert without_bob, "bob's death went unnoticed"
    assert all(r["workers"] == ["alice", "charlie"] for r in records if r["round"] in without_bob)
    assert any("UNAVAILABLE" in r["failed"].get("bob", "") for r in records)
    assert max(without_bob) < 30 and all("bob" in r["workers"] for r in records[max(without_bob):]), "bob never came back"


def test_coordinator_killed_and_resumed_ends_with_the_same_model(workers, tmp_path):
    killed_after_round_3_and_resumed(workers, tmp_path, "--rounds", "6", "--seed", "7", "--batches", "3")


def killed_after_round_3_and_resumed(workers: Dict[str, Process], tmp_path: Path, *common: str) -> None:
    """A 6-round run straight, and the same run killed by SIGKILL in round 4 then
    resumed: the resumed run records rounds 1-6 once and ends with the same weights."""
    finish(coordinator(workers, tmp_path / "straight", *common))
    proc = coordinator(workers, tmp_path / "broken", *common)
    read_until(proc, "Training round 4/")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    output = finish(coordinator(workers, tmp_path / "broken", *common, "--resume"))
    assert "Resuming after round 3/6" in output
    straight = load_file(str(tmp_path / "straight" / "model.safetensors"))
    resumed = load_file(str(tmp_path / "broken" / "model.safetensors"))
    assert straight.keys() == resumed.keys()
    assert all(straight[k].equal(resumed[k]) for k in straight)
    assert [r["round"] for r in metrics(tmp_path / "broken")] == list(range(1, 7))


def test_fresh_run_refuses_a_folder_holding_a_run(workers, tmp_path):
    finish(coordinator(workers, tmp_path, "--rounds", "1", "--batches", "1"))
    proc = coordinator(workers, tmp_path, "--rounds", "1", "--batches", "1")
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode != 0 and "--resume" in output


def test_straggler_does_not_hold_the_round_past_its_deadline(workers, tmp_path):
    charlie = workers["charlie"]
    proc = coordinator(workers, tmp_path, "--rounds", "30", "--batches", "2", "--min-workers", "2",
                       "--round-timeout", "2")
    read_until(proc, "Training round 3/")
    charlie.popen.send_signal(signal.SIGSTOP)
    try:
        read_until(proc, "Training round 6/")
    finally:
        charlie.popen.send_signal(signal.SIGCONT)
    finish(proc)
    records = metrics(tmp_path)
    late = [r for r in records if "charlie" in r["late"]]
    assert late, "the stopped worker was never late"
    assert all(r["workers"] == ["alice", "bob"] for r in late), "a late update was averaged"
    assert max(r["duration_s"] for r in late) < 2 + 3, "a round waited well past its 2 s deadline"
    assert "charlie" in records[-1]["workers"], "charlie never contributed again after waking"


def test_evaluator_down_training_goes_on(workers, tmp_path):
    closed = f"{HOST}:{free_port()}"
    proc = coordinator(workers, tmp_path, "--rounds", "5", "--batches", "1", "--eval-every", "2",
                       f"--evaluator=testing={closed}", "--eval-timeout", "2")
    finish(proc)
    records = metrics(tmp_path)
    assert [r["round"] for r in records] == [1, 2, 3, 4, 5]
    assert [r["round"] for r in records if "evaluation_error" in r] == [1, 3, 5]
    assert all("UNAVAILABLE" in r["evaluation_error"] for r in records if "evaluation_error" in r)


def test_sigterm_stops_the_coordinator_cleanly_and_resume_finishes(workers, tmp_path):
    common = ["--rounds", "8", "--batches", "2"]
    proc = coordinator(workers, tmp_path, *common)
    read_until(proc, "Training round 3/")
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, output
    assert "--resume" in output
    done = [r["round"] for r in metrics(tmp_path)]
    assert done == list(range(1, len(done) + 1)) and len(done) < 8
    finish(coordinator(workers, tmp_path, *common, "--resume"))
    assert [r["round"] for r in metrics(tmp_path)] == list(range(1, 9))


def test_rounds_the_status_contract_cannot_carry_are_refused_at_start(tmp_path):
    """rounds = 5e9 would wrap in RunStatus.rounds (uint32) and GetStatus answered UNKNOWN."""
    config = tmp_path / "federation.toml"
    config.write_text(f"[federation]\nrounds = 5000000000\n[workers.alice]\naddress = '{HOST}:{free_port()}'\n")
    done = subprocess.run(jetfed_command("coordinator", "--config", str(config), "--out", str(tmp_path / "run")),
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert "rounds: 5000000000 must be an integer in 1..4294967295" in done.stderr
    assert not (tmp_path / "run").exists()
