"""The start of a run as the user sees it: whom the coordinator awaits, who answered,
and a loud, recorded warning for a configured worker that never did (or a clear
failure when the whole fleet is required or nobody is up)."""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path
from typing import List

import pytest

from coordinator.cli import summary_lines
from coordinator.federation import RunFailed
from coordinator.runner import run
from coordinator.settings import RunSettings
from jetfed.config import TrainConfig
from tests.conftest import free_port
from tests.integration.processes import HOST, Fleet, jetfed_command

NAMES = ["alice", "bob", "charlie"]


def settings_for(fleet: Fleet, out: Path, extra_workers: dict, **overrides: object) -> RunSettings:
    workers = {name: fleet.workers[name].address for name in NAMES}
    workers.update(extra_workers)
    values = dict(
        workers=workers, evaluator=fleet.evaluator.address, out_dir=out, rounds=2, eval_every=10,
        train=TrainConfig(lr=0.1, batch_size=32, max_batches=2, seed=1), round_timeout=60.0, eval_timeout=60.0,
        connect_timeout=6.0, max_backoff=1.0,
    )
    values.update(overrides)
    return RunSettings(**values).validated()  # type: ignore[arg-type]


def test_a_never_started_worker_is_named_early_warned_and_recorded(fleet: Fleet, tmp_path: Path) -> None:
    dave = f"{HOST}:{free_port()}"
    settings = settings_for(fleet, tmp_path, {"dave": dave})
    lines: List[str] = []
    summary = asyncio.run(run(settings, say=lines.append))
    assert lines[0].startswith("Waiting up to 6s for 4 workers: alice at "), lines
    assert f"dave at {dave}" in lines[0]
    assert any(line.startswith("Still waiting for dave (5s of 6s); answered so far: alice, bob, charlie")
               for line in lines), lines
    warning = next(line for line in lines if line.startswith("WARNING: going on with 3 of 4 workers"))
    assert f"dave at {dave} (never answered: UNAVAILABLE" in warning and "--min-workers all" in warning
    assert lines.index(warning) < lines.index("Training round 1/2")
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert set(records[0]["unreachable_at_start"]) == {"dave"}
    assert "unreachable_at_start" not in records[1]
    assert all(r["workers"] == NAMES for r in records)
    assert summary.never_contributed == ["dave"]
    last = summary_lines(summary, settings)[-1]
    assert last.startswith("WARNING: 1 of 4 workers never contributed: dave (never answered: UNAVAILABLE"), last


def test_requiring_the_whole_fleet_fails_before_any_round(fleet: Fleet, tmp_path: Path) -> None:
    dave = f"{HOST}:{free_port()}"
    settings = settings_for(fleet, tmp_path, {"dave": dave}, min_workers=4, connect_timeout=2.0)
    lines: List[str] = []
    with pytest.raises(RunFailed, match=rf"only 3 of the 4 workers answered within 2s and this run needs 4: "
                                        rf"dave at {dave}: never answered: UNAVAILABLE"):
        asyncio.run(run(settings, say=lines.append))
    assert not any(line.startswith("Training round") for line in lines)
    assert (tmp_path / "metrics.jsonl").read_text() == ""


def test_no_worker_up_names_every_address_and_the_likely_causes(tmp_path: Path) -> None:
    """Through the real CLI, as a user would see it: one error line, no traceback."""
    addresses = {name: f"{HOST}:{free_port()}" for name in NAMES}
    argv = [*jetfed_command("coordinator"), "--rounds", "1", "--out", str(tmp_path / "run"), "--connect-timeout", "1",
            *[f"--worker={name}={address}" for name, address in addresses.items()]]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert "none of the 3 workers answered within 1s and this run needs 2" in done.stderr
    assert all(f"{name} at {address}: never answered" in done.stderr for name, address in addresses.items())
    assert "Likely causes: the worker is not started" in done.stderr and "TLS on one side only" in done.stderr
    assert done.stdout.startswith("Waiting up to 1s for 3 workers: alice at ")


def test_a_taken_status_port_is_one_line_before_anything_is_written(fleet: Fleet, tmp_path: Path) -> None:
    """The status address on the evaluator's port: refused at start (gRPC would otherwise
    share the port via SO_REUSEPORT and take the evaluator's calls)."""
    out = tmp_path / "run"
    argv = [*jetfed_command("coordinator"), "--rounds", "1", "--out", str(out),
            "--status-address", fleet.evaluator.address,
            *[f"--worker={name}={fleet.workers[name].address}" for name in NAMES]]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert f"--status-address: cannot listen on {fleet.evaluator.address}: the port is taken" in done.stderr
    assert not out.exists()
