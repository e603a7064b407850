"""--secure-aggregation is refused at start-up, with one line naming the setting, for
everything that needs each worker's update or cannot fit the protocol."""

from __future__ import annotations

from pathlib import Path

import pytest

from coordinator.settings import RunSettings
from coordinator.strategies.registry import StrategySpec
from jetfed.config import TrainConfig
from jetfed.errors import InvalidConfig

WORKERS = {"a": "h:1", "b": "h:2", "c": "h:3"}


def settings(**fields) -> RunSettings:
    return RunSettings(**{"workers": WORKERS, "evaluator": None, "out_dir": Path("out"), "secure_aggregation": True,
                          **fields})


@pytest.mark.parametrize("strategy", ["median", "trimmed-mean", "krum", "multi-krum", "centered-clip", "scaffold",
                                      "fedbuff", "fedasync", "dp-fedavg"])
def test_strategies_that_need_each_update_are_refused(strategy: str) -> None:
    with pytest.raises(InvalidConfig, match=r"^--secure-aggregation: strategy " + strategy):
        settings(strategy=StrategySpec(strategy)).validated()


@pytest.mark.parametrize("strategy", ["fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad"])
def test_the_sum_only_family_runs(strategy: str) -> None:
    assert settings(strategy=StrategySpec(strategy)).validated().secagg_resolved_threshold == 2


@pytest.mark.parametrize("fields, words", [
    ({"max_concurrency": 2}, "--max-concurrency 2"),
    ({"train": TrainConfig(uplink_encoding="int8")}, "does not compress"),
    ({"workers": {"a": "h:1", "b": "h:2"}}, "at least 3 workers"),
    ({"secagg_threshold": 3}, "threshold in 2..2"),
    ({"secagg_clip": 0.5}, "secagg_clip"),
])
def test_settings_that_cannot_fit_are_refused(fields, words: str) -> None:
    with pytest.raises(InvalidConfig, match=words):
        settings(**fields).validated()


def test_off_by_default() -> None:
    assert not RunSettings(workers=WORKERS, evaluator=None, out_dir=Path("out")).validated().secure_aggregation


def test_the_flag_and_the_config_key(tmp_path: Path) -> None:
    from coordinator.cli import parse_args, settings_from

    workers = ["--worker", "a=h:1", "--worker", "b=h:2", "--worker", "c=h:3"]
    assert settings_from(parse_args([*workers, "--secure-aggregation", "--secagg-clip", "2"])).secagg_clip == 2.0
    config = tmp_path / "federation.toml"
    config.write_text("[federation]\nsecure_aggregation = true\n[strategy]\nname = \"krum\"\n")
    with pytest.raises(InvalidConfig, match="^--secure-aggregation: strategy krum"):
        settings_from(parse_args(["--config", str(config), *workers]))
    assert not settings_from(parse_args(workers)).secure_aggregation
