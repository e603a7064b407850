"""Every strategy runs for real: a short federation over the session's worker and
evaluator processes (real gRPC), the coordinator in-process. Robust rules are run with
the quorum they need; the asynchronous ones make versions from buffered updates."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any, Dict, List

import pytest
import torch
from safetensors.torch import load_file

from coordinator.runner import run
from coordinator.settings import RunSettings
from coordinator.strategies.registry import PRESETS, StrategySpec
from jetfed.config import TrainConfig
from jetfed.errors import InvalidConfig
from tests.integration.processes import Fleet

NAMES = ["alice", "bob", "charlie"]
# With three workers: f=0 for Krum (it needs 2f+3 updates), the whole fleet for the others.
PARAMS: Dict[str, Dict[str, Any]] = {"krum": {"f": 0}, "multi-krum": {"f": 0}}


def settings_for(fleet: Fleet, out: Path, name: str, rounds: int = 2, **extra: Any) -> RunSettings:
    return RunSettings(
        workers={n: fleet.workers[n].address for n in NAMES}, evaluator=fleet.evaluator.address, out_dir=out,
        rounds=rounds, eval_every=rounds, train=TrainConfig(batch_size=16, max_batches=2, seed=3),
        min_workers=3 if not PRESETS[name].asynchronous else None,
        strategy=StrategySpec(name, PARAMS.get(name, {})), round_timeout=60.0, eval_timeout=60.0,
        connect_timeout=30.0, **extra,
    ).validated()


def records(out: Path) -> List[Dict[str, Any]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("name", list(PRESETS))
def test_a_short_run_of_every_strategy(fleet: Fleet, tmp_path: Path, name: str) -> None:
    settings = settings_for(fleet, tmp_path, name, rounds=3)
    lines: List[str] = []
    summary = asyncio.run(run(settings, say=lines.append))
    got = records(tmp_path)
    assert [r["round"] for r in got] == [1, 2, 3]
    assert summary.final_score is not None and 0.0 <= summary.final_score.accuracy <= 1.0
    model = load_file(str(tmp_path / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in model.values() if t.is_floating_point())
    state = json.loads((tmp_path / "checkpoint" / "state.json").read_text())
    assert state["run"]["strategy"] == {"name": name, "params": settings.strategy.resolved()}
    if PRESETS[name].asynchronous:
        assert any("Training asynchronously" in line for line in lines)
        for record in got:
            assert len(record["workers"]) == settings.strategy.resolved()["buffer_size"]
            assert all(u["staleness"] >= 0 and u["base_version"] < record["version"] for u in record["updates"].values())
    else:
        assert all(r["workers"] == NAMES for r in got)
    if name in ("krum", "multi-krum"):
        assert all(len(r["strategy"]["chosen"]) == (1 if name == "krum" else 3) for r in got)
    if name in ("fedavgm", "fedadam", "fedyogi", "fedadagrad"):
        assert state["strategy"]["file"].startswith("strategy-000003")


def test_a_robust_rule_that_cannot_hold_is_refused_before_the_run(fleet: Fleet, tmp_path: Path) -> None:
    with pytest.raises(InvalidConfig, match="krum withstands f=1 hostile workers only with 5 updates"):
        RunSettings(workers={n: fleet.workers[n].address for n in NAMES}, evaluator=None, out_dir=tmp_path,
                    strategy=StrategySpec("krum")).validated()


def test_fedprox_sends_its_mu_and_pulls_updates_toward_the_global_model(fleet: Fleet, tmp_path: Path) -> None:
    """The same round with mu = 0 and a large mu: the proximal term shortens every change."""
    norms = {}
    for mu in (0.0, 5.0):
        out = tmp_path / f"mu{mu}"
        settings = settings_for(fleet, out, "fedprox", rounds=1)
        settings = RunSettings(**{**settings.__dict__, "strategy": StrategySpec("fedprox", {"mu": mu})}).validated()
        asyncio.run(run(settings, say=lambda line: None))
        norms[mu] = {n: u["delta_norm"] for n, u in records(out)[0]["updates"].items()}
    assert all(norms[5.0][n] < norms[0.0][n] for n in NAMES), norms
