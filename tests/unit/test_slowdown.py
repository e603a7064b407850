"""A worker's --slowdown is checked once at start-up, with an error naming the flag."""

from __future__ import annotations

import math

import pytest

from jetfed.errors import InvalidConfig
from worker.cli import parse_args
from worker.service import slowdown_factor


@pytest.mark.parametrize("value", [1.0, 1.5, 4.0, 1000.0])
def test_factors_from_one_to_a_thousand_pass(value: float) -> None:
    assert slowdown_factor(value) == value


@pytest.mark.parametrize("value", [0.0, 0.5, -2.0, 1000.5, math.inf, math.nan])
def test_a_bad_factor_is_refused_by_name(value: float) -> None:
    with pytest.raises(InvalidConfig, match=r"^--slowdown: .* must be a finite number in \[1, 1000\]"):
        slowdown_factor(value)


def test_the_flag_defaults_to_the_board_s_own_speed() -> None:
    assert parse_args(["--name", "alice"]).slowdown == 1.0
    assert parse_args(["--name", "alice", "--slowdown", "4"]).slowdown == 4.0
