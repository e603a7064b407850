from __future__ import annotations

import math
from dataclasses import replace

import pytest

from jetfed.config import TrainConfig
from jetfed.errors import InvalidConfig


def test_defaults_are_the_reference_recipe_and_valid():
    config = TrainConfig()
    assert config.validated() is config
    assert (config.optimizer, config.loss, config.lr, config.batch_size, config.max_batches, config.epochs) == (
        "sgd", "nll", 0.1, 32, 10, 1,
    )
    assert config.proximal_mu == 0.0  # plain local training: FedProx is asked for
    assert config.scaffold is False  # and so is SCAFFOLD


@pytest.mark.parametrize(
    "changes",
    [
        {"optimizer": "adam", "lr": 1e-3},
        {"momentum": 0.9},
        {"max_batches": 0},
        {"lr": 100.0},
        {"batch_size": 65536, "epochs": 1000, "seed": 2**63 - 1},
        {"proximal_mu": 0.01},
        {"proximal_mu": 1000.0},
        {"scaffold": True},
        {"scaffold": True, "momentum": 0.5, "proximal_mu": 0.01},
    ],
)
def test_edges_inside_the_ranges_pass(changes):
    replace(TrainConfig(), **changes).validated()


@pytest.mark.parametrize(
    "field, value",
    [
        ("lr", 0.0),
        ("lr", -0.1),
        ("lr", math.nan),
        ("lr", math.inf),
        ("lr", 100.5),
        ("batch_size", 0),
        ("batch_size", 65537),
        ("max_batches", 10**9),
        ("max_batches", -1),
        ("epochs", 0),
        ("optimizer", "rmsprop"),
        ("loss", "mse"),
        ("momentum", 1.0),
        ("momentum", -0.1),
        ("momentum", math.nan),
        ("seed", -1),
        ("seed", 2**63),
        ("proximal_mu", -0.01),
        ("proximal_mu", 1000.5),
        ("proximal_mu", math.nan),
        ("proximal_mu", math.inf),
    ],
)
def test_out_of_range_field_is_named_first(field, value):
    with pytest.raises(InvalidConfig) as caught:
        replace(TrainConfig(), **{field: value}).validated()
    assert str(caught.value).startswith(f"{field}: ")


def test_scaffold_with_adam_is_refused_naming_both_fields():
    """SCAFFOLD's correction and its control update assume plain SGD steps."""
    with pytest.raises(InvalidConfig) as caught:
        TrainConfig(optimizer="adam", lr=1e-3, scaffold=True).validated()
    message = str(caught.value)
    assert message.startswith("scaffold: ")
    assert "optimizer" in message and "'adam'" in message and "'sgd'" in message
