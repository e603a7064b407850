"""Every setting is bounded by what its field and the status contract carry: a value
that would wrap (rounds as uint32) or overflow a deadline is refused, naming the field."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest

from coordinator.cli import parse_args, settings_from
from coordinator.settings import MAX_ROUNDS, RunSettings
from jetfed.config import TrainConfig
from jetfed.errors import InvalidConfig


def settings(**changes) -> RunSettings:
    base = RunSettings(workers={"alice": "127.0.0.1:50051"}, evaluator=None, out_dir=Path("runs/x"))
    return replace(base, **changes)


@pytest.mark.parametrize("changes, field", [
    ({"rounds": 5_000_000_000}, "rounds"),
    ({"rounds": MAX_ROUNDS + 1}, "rounds"),
    ({"rounds": 2.5}, "rounds"),
    ({"eval_every": 2**32}, "eval_every"),
    ({"round_retries": 10**9}, "round_retries"),
    ({"round_timeout": 1e300}, "round_timeout"),
    ({"max_backoff": 1e12}, "max_backoff"),
    ({"max_norm_ratio": 1.0}, "max_norm_ratio"),
    ({"max_norm_ratio": math.nan}, "max_norm_ratio"),
    ({"max_norm_ratio": math.inf}, "max_norm_ratio"),
    ({"max_payload_bytes": 0}, "max_payload_bytes"),
    ({"max_payload_bytes": 1 << 40}, "max_payload_bytes"),
    ({"status_address": "127.0.0.1:70000"}, "status_address"),
    ({"metrics_address": "0.0.0.0:99999"}, "metrics_address"),
    ({"train": TrainConfig(max_batches=2**40)}, "max_batches"),
    ({"train": TrainConfig(batch_size=2**32)}, "batch_size"),
    ({"train": TrainConfig(epochs=2**32)}, "epochs"),
])
def test_a_value_its_field_cannot_carry_is_refused(changes, field):
    with pytest.raises(InvalidConfig) as caught:
        settings(**changes).validated()
    assert str(caught.value).startswith(f"{field}: ")


def test_the_largest_values_the_contract_carries_are_accepted():
    run = settings(rounds=MAX_ROUNDS, eval_every=MAX_ROUNDS, round_timeout=7 * 24 * 3600.0,
                   status_address="127.0.0.1:65535").validated()
    assert run.rounds == 2**32 - 1


def test_rounds_from_a_toml_file_are_bounded(tmp_path):
    config = tmp_path / "federation.toml"
    config.write_text("[federation]\nrounds = 5000000000\n[workers.a]\naddress = 'h:1'\n")
    with pytest.raises(InvalidConfig, match=r"^rounds: 5000000000 must be an integer in 1\.\.4294967295$"):
        settings_from(parse_args(["--config", str(config)]))


def test_max_norm_ratio_from_file_and_flag(tmp_path):
    config = tmp_path / "federation.toml"
    config.write_text("[training]\nmax_norm_ratio = 25\n[workers.a]\naddress = 'h:1'\n")
    assert settings_from(parse_args(["--config", str(config)])).max_norm_ratio == 25.0
    assert settings_from(parse_args(["--config", str(config), "--max-norm-ratio", "4"])).max_norm_ratio == 4.0
    assert settings_from(parse_args(["--worker", "a=h:1"])).max_norm_ratio == 10.0
