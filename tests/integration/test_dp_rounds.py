"""DP-SGD for real: the session's worker processes train private rounds over gRPC, the
coordinator records each worker's epsilon per round in metrics.jsonl, and a run whose
workers have all spent their budget stops with one line."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, List

import pytest

from coordinator.federation import RunFailed
from coordinator.runner import run
from coordinator.settings import RunSettings
from jetfed.config import TrainConfig
from tests.integration.processes import Fleet

NAMES = ["alice", "bob", "charlie"]
# A whole pass a round (max_batches 0): every worker takes about one pass of Poisson
# samples, so their epsilons stay close whatever their sizes.
DP = TrainConfig(batch_size=32, max_batches=0, seed=3, noise_multiplier=1.0, max_grad_norm=1.0, dp_delta=1e-5)


def settings_for(fleet: Fleet, out: Path, train: TrainConfig, rounds: int) -> RunSettings:
    return RunSettings(
        workers={n: fleet.workers[n].address for n in NAMES}, evaluator=fleet.evaluator.address, out_dir=out,
        rounds=rounds, eval_every=rounds, train=train, min_workers=3, round_retries=0, round_timeout=60.0,
        eval_timeout=60.0, connect_timeout=30.0,
    ).validated()


def records(out: Path) -> List[Dict[str, Any]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow  # ~35 s, most of it the workers' first opacus import; tests/unit/test_privacy.py runs DP rounds in process
def test_dp_sgd_rounds_record_each_workers_epsilon_in_metrics(fleet: Fleet, tmp_path: Path) -> None:
    asyncio.run(run(settings_for(fleet, tmp_path, DP, rounds=2), say=lambda line: None))
    first, second = records(tmp_path)
    for record in (first, second):
        assert record["privacy"]["delta"] == 1e-5
        assert set(record["privacy"]["epsilon"]) == set(NAMES)
        assert record["privacy"]["max_epsilon"] == max(record["privacy"]["epsilon"].values())
        for name in NAMES:
            assert record["updates"][name]["epsilon"] == record["privacy"]["epsilon"][name] > 0
            assert record["updates"][name]["delta"] == 1e-5
    # Cumulative: every worker's epsilon grows with its rounds.
    assert all(second["privacy"]["epsilon"][n] > first["privacy"]["epsilon"][n] for n in NAMES)


def test_a_run_whose_every_worker_is_out_of_budget_stops_with_one_line(fleet: Fleet, tmp_path: Path) -> None:
    """A budget below one round's epsilon: every worker refuses round 1 at its header,
    before it trains (a round that fits and one that does not: tests/unit/test_privacy.py)."""
    with pytest.raises(RunFailed) as stopped:
        asyncio.run(run(settings_for(fleet, tmp_path, replace(DP, epsilon_budget=0.01), rounds=3),
                        say=lambda line: None))
    assert "every worker asked has spent its privacy budget" in str(stopped.value)
    assert str(stopped.value).count("RESOURCE_EXHAUSTED: privacy budget spent") == 3
    assert not (tmp_path / "metrics.jsonl").exists() or not records(tmp_path)
