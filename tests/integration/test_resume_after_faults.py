"""A resume always works and never duplicates: a real coordinator process, run against
the shared fleet, is stopped the ways a disk or an operator stops it (a torn last line,
a full disk at the checkpoint or at metrics.jsonl, a removed checkpoint, an --out that
cannot be a folder), and `--resume` ends with rounds 1..N in metrics.jsonl once each,
or refuses with one line naming the fix."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import List

import pytest

from tests.conftest import free_port
from tests.integration.processes import HOST, Fleet, jetfed_command

pytestmark = pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")


def coordinator(fleet: Fleet, out: Path, rounds: int, *extra: str) -> subprocess.CompletedProcess:
    args = ["coordinator", "--out", str(out), "--rounds", str(rounds), "--batches", "1", "--seed", "5",
            "--connect-timeout", "30", "--max-backoff", "1", *extra]
    args += [f"--worker={name}={process.address}" for name, process in fleet.workers.items()]
    return subprocess.run(jetfed_command(*args), capture_output=True, text=True, timeout=180)


def finished(done: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def one_error_line(done: subprocess.CompletedProcess, *fragments: str) -> str:
    """Exit 1 with one ERROR line holding every fragment, and no traceback."""
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    errors = [line for line in done.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and all(f in errors[0] for f in fragments), done.stderr
    return errors[0]


def rounds(out: Path) -> List[int]:
    return [json.loads(line)["round"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_a_torn_last_line_and_lines_past_the_checkpoint_are_dropped(fleet: Fleet, tmp_path: Path) -> None:
    finished(coordinator(fleet, tmp_path, 2))
    metrics = tmp_path / "metrics.jsonl"
    second = json.loads(metrics.read_text().splitlines()[1])
    with metrics.open("a") as handle:
        handle.write(json.dumps({**second, "round": 3}) + "\n")
        handle.write('{"round": 4, "failed": {}, "la')
    done = finished(coordinator(fleet, tmp_path, 4, "--resume"))
    assert "Resuming after round 2/4" in done.stdout
    assert "dropped the torn end of" in done.stderr and "dropped the metrics of rounds 3, after" in done.stderr
    assert rounds(tmp_path) == [1, 2, 3, 4]


def test_a_round_checkpointed_but_not_yet_recorded_is_put_back(fleet: Fleet, tmp_path: Path) -> None:
    """The coordinator stopped between the checkpoint and the metrics line."""
    finished(coordinator(fleet, tmp_path, 2))
    metrics = tmp_path / "metrics.jsonl"
    lines = metrics.read_text().splitlines(keepends=True)
    metrics.write_text(lines[0])
    finished(coordinator(fleet, tmp_path, 3, "--resume"))
    assert metrics.read_text().splitlines(keepends=True)[:2] == lines
    assert rounds(tmp_path) == [1, 2, 3]


def test_rounds_without_a_checkpoint_are_refused_not_run_twice(fleet: Fleet, tmp_path: Path) -> None:
    finished(coordinator(fleet, tmp_path, 2))
    before = (tmp_path / "metrics.jsonl").read_text()
    shutil.rmtree(tmp_path / "checkpoint")
    one_error_line(coordinator(fleet, tmp_path, 3, "--resume"), "holds rounds 1-2 but", "holds no checkpoint",
                   "Put the checkpoint folder back")
    assert (tmp_path / "metrics.jsonl").read_text() == before


def test_a_full_disk_at_the_first_checkpoint_then_resume_records_each_round_once(fleet: Fleet, tmp_path: Path) -> None:
    partial = tmp_path / "checkpoint" / "global-000001.safetensors.partial"
    partial.parent.mkdir(parents=True)
    partial.symlink_to("/dev/full")
    one_error_line(coordinator(fleet, tmp_path, 2), "out: cannot use", "No space left on device",
                   "--resume runs round 1 again")
    assert rounds(tmp_path) == []
    partial.unlink()
    finished(coordinator(fleet, tmp_path, 2, "--resume"))
    assert rounds(tmp_path) == [1, 2]


def test_a_full_disk_at_metrics_then_resume_takes_the_record_from_the_checkpoint(fleet: Fleet, tmp_path: Path) -> None:
    metrics = tmp_path / "metrics.jsonl"
    metrics.symlink_to("/dev/full")
    one_error_line(coordinator(fleet, tmp_path, 2), f"out: cannot use {metrics}: No space left on device",
                   "takes round 1's record from its checkpoint")
    metrics.unlink()
    done = finished(coordinator(fleet, tmp_path, 2, "--resume"))
    assert "round 1's metrics restored from its checkpoint" in done.stderr
    assert rounds(tmp_path) == [1, 2]


def test_an_out_that_cannot_be_a_folder_is_one_line(fleet: Fleet, tmp_path: Path) -> None:
    """A path under a regular file cannot be created, by root too (chmod would not stop root)."""
    (tmp_path / "file").write_text("")
    out = tmp_path / "file" / "run"
    one_error_line(coordinator(fleet, out, 1), f"out: cannot use {out}: Not a directory", "choose a writable --out")


def test_a_resumed_run_does_not_wait_for_an_evaluator_that_is_down(fleet: Fleet, tmp_path: Path) -> None:
    finished(coordinator(fleet, tmp_path, 1))
    started = time.monotonic()
    done = finished(coordinator(fleet, tmp_path, 2, "--resume", f"--evaluator=testing={HOST}:{free_port()}",
                                "--eval-timeout", "2"))
    assert time.monotonic() - started < 25, "waited for the evaluator as long as --connect-timeout (30 s)"
    assert "did not answer (no answer 5s after the workers)" in done.stdout
    assert rounds(tmp_path) == [1, 2]
