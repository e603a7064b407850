"""DP-SGD's arithmetic and the worker's privacy ledger (jetfed.privacy)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from jetfed import privacy, wire
from jetfed.config import TrainConfig
from jetfed.errors import InvalidConfig, WorkerStateError
from jetfed.privacy import Ledger, PrivacyBudgetExhausted, Spend
from jetfed.tasks.base import TensorExamples
from jetfed.training import train_round

DP = dict(noise_multiplier=1.0, max_grad_norm=0.5, dp_delta=1e-5)


class Tiny(nn.Module):
    """A convolution and a linear layer, as mnist-cnn has, on 8x8 images: fast."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.fc = nn.Linear(4 * 6 * 6, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(self.fc(F.relu(self.conv(x)).flatten(1)), dim=1)


def examples(n: int = 64, seed: int = 0) -> TensorExamples:
    generator = torch.Generator().manual_seed(seed)
    return TensorExamples(torch.randn(n, 1, 8, 8, generator=generator) * 5,
                          torch.randint(0, 10, (n,), generator=generator), torch.device("cpu"))


def per_example_norms(grads: list) -> torch.Tensor:
    return torch.stack([g.reshape(g.shape[0], -1).double().pow(2).sum(1) for g in grads]).sum(0).sqrt()


def each_examples_gradient(model: nn.Module, data: TensorExamples) -> list:
    """Every example's gradient, one backward pass each: what per-example means."""
    grads = []
    for i in range(len(data)):
        alone = Tiny()
        alone.load_state_dict(model.state_dict())
        F.nll_loss(alone(data.inputs[i:i + 1]), data.labels[i:i + 1]).backward()
        grads.append([p.grad.clone() for p in alone.parameters()])
    return [torch.stack(per_param) for per_param in zip(*grads)]


@pytest.mark.parametrize("book_keeping", [True, False], ids=["book-keeping", "opacus"])
def test_the_step_is_the_sum_of_each_examples_clipped_gradient_and_clipping_bounds_every_one(
    book_keeping: bool,
) -> None:
    torch.manual_seed(0)
    model, data = Tiny(), examples(16)
    config = TrainConfig(batch_size=16, noise_multiplier=1e-9, max_grad_norm=0.5, dp_delta=1e-5).validated()
    per_example = each_examples_gradient(model, data)
    norms = per_example_norms(per_example)
    assert (norms > 2 * config.max_grad_norm).all(), "the test needs gradients over the bound"
    for i in range(len(data)):
        clipped = privacy.clipped_sum([g[i:i + 1] for g in per_example], config.max_grad_norm)
        assert float(per_example_norms([c.unsqueeze(0) for c in clipped])) <= config.max_grad_norm * (1 + 1e-6)
    dp = privacy.PrivateGradients(model, config, len(data), torch.Generator().manual_seed(1),
                                  book_keeping=book_keeping)
    try:
        assert (dp._book is not None) is book_keeping
        F.nll_loss(dp.forward(data.inputs), data.labels).backward()
        dp.privatize(len(data))
    finally:
        dp.close()
    # The step's gradient: the clipped sum (noise ~0 here) over the expected batch.
    step = torch.cat([p.grad.flatten() for p in model.parameters()]).double() * len(data)
    expected = torch.cat([c.flatten() for c in privacy.clipped_sum(per_example, config.max_grad_norm)]).double()
    torch.testing.assert_close(step, expected, rtol=1e-4, atol=1e-6)
    assert float(step.norm()) <= len(data) * config.max_grad_norm * (1 + 1e-6)
    # Without clipping the step would be the plain sum, far over the bound.
    assert float(torch.cat([g.sum(0).flatten() for g in per_example]).norm()) > len(data) * config.max_grad_norm


def test_an_example_within_the_bound_is_left_as_it_is() -> None:
    g = [torch.tensor([[0.3, 0.4]]), torch.tensor([[0.0]])]  # norm 0.5
    out = privacy.clipped_sum(g, 1.0)
    torch.testing.assert_close(out[0], torch.tensor([0.3, 0.4]))


def test_noise_has_the_stated_standard_deviation() -> None:
    sigma, clip, n = 1.3, 0.7, 400_000
    noised = privacy.add_noise([torch.zeros(n)], sigma, clip, torch.Generator().manual_seed(7))[0].double()
    # The sample std's standard error is std / sqrt(2n) = 0.0014 here: 1% is over 6 of them,
    # and the nearest wrong answers (sigma alone 1.3, the clip alone 0.7) are far outside.
    assert abs(float(noised.std()) - sigma * clip) < 0.01 * sigma * clip
    assert abs(float(noised.mean())) < 5 * sigma * clip / math.sqrt(n)


def test_the_accountant_gives_the_librarys_published_value() -> None:
    # Opacus's own test (accountants_test.py): sigma 1.5, q 0.04, 90 epochs, delta 1e-5.
    assert privacy.epsilon_of([Spend(1, 1.5, 0.04, 2250)], 1e-5) == pytest.approx(7.32911117143, abs=1e-6)
    # Rounds compose as one run of their steps.
    rounds = [Spend(r, 1.5, 0.04, 250) for r in range(1, 10)]
    assert privacy.epsilon_of(rounds, 1e-5) == pytest.approx(7.32911117143, abs=1e-6)
    assert privacy.epsilon_of([], 1e-5) == 0.0


def test_a_round_over_the_budget_is_refused_before_anything_is_spent(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path)
    config = TrainConfig(batch_size=64, max_batches=100, epsilon_budget=1.5, **DP).validated()
    spend = privacy.round_spend(1, config, 6400)
    assert spend == Spend(1, 1.0, 0.01, 100)
    rounds = 0
    with pytest.raises(PrivacyBudgetExhausted) as refused:
        while True:
            after = ledger.check_budget("run-a", privacy.round_spend(rounds + 1, config, 6400), config)
            assert after <= 1.5
            ledger.record("run-a", privacy.round_spend(rounds + 1, config, 6400))
            rounds += 1
            assert rounds < 100
    assert rounds == 3  # epsilon 1.21, 1.34, 1.45; a fourth round would take it to 1.55
    assert ledger.epsilon("run-a", 1e-5) <= 1.5 < privacy.epsilon_of([*ledger.spends("run-a"), spend], 1e-5)
    assert len(ledger.spends("run-a")) == rounds  # the refused round spent nothing
    assert refused.value.code.name == "RESOURCE_EXHAUSTED"
    assert privacy.refused_for_budget(f"RESOURCE_EXHAUSTED: {refused.value}")
    assert "epsilon_budget 1.5" in str(refused.value)
    # Another run has its own budget.
    ledger.check_budget("run-b", spend, config)


def test_the_ledger_survives_a_restart_and_refuses_a_damaged_file(tmp_path: Path) -> None:
    Ledger(tmp_path).record("run", Spend(1, 1.1, 0.01, 10))
    Ledger(tmp_path).record("run", Spend(2, 1.1, 0.01, 10))
    again = Ledger(tmp_path)  # a restarted worker
    assert again.spends("run") == [Spend(1, 1.1, 0.01, 10), Spend(2, 1.1, 0.01, 10)]
    assert again.epsilon("run", 1e-5) == pytest.approx(privacy.epsilon_of([Spend(0, 1.1, 0.01, 20)], 1e-5))
    path = next(tmp_path.glob("privacy-*.json"))
    path.write_text(path.read_text().replace('"steps": 10', '"steps": -3', 1))
    with pytest.raises(WorkerStateError, match="impossible entry"):
        again.spends("run")
    path.write_text("{not json")
    with pytest.raises(WorkerStateError, match="cannot be read as a privacy ledger"):
        again.spends("run")


@pytest.mark.parametrize("field,value", [("noise_multiplier", -1.0), ("noise_multiplier", math.nan),
                                         ("max_grad_norm", math.inf), ("dp_delta", -1e-5),
                                         ("epsilon_budget", math.nan)])
def test_impossible_values_are_refused_naming_the_field(field: str, value: float) -> None:
    message = wire.config_to_proto(TrainConfig(**DP))
    setattr(message, field, value)
    with pytest.raises(InvalidConfig, match=f"^{field}: "):
        wire.config_from_proto(message)


def test_dp_fields_need_noise_and_a_bound_and_a_delta() -> None:
    with pytest.raises(InvalidConfig, match="^max_grad_norm: .* needs noise_multiplier"):
        TrainConfig(max_grad_norm=1.0).validated()
    with pytest.raises(InvalidConfig, match="^max_grad_norm: DP-SGD"):
        TrainConfig(noise_multiplier=1.0, dp_delta=1e-5).validated()
    with pytest.raises(InvalidConfig, match="^dp_delta: "):
        TrainConfig(noise_multiplier=1.0, max_grad_norm=1.0, dp_delta=1.0).validated()
    assert wire.config_from_proto(wire.config_to_proto(TrainConfig(**DP))) == TrainConfig(**DP)
    assert not TrainConfig().private


def test_a_private_round_replays_by_its_seed_and_claims_the_plain_loops_examples() -> None:
    data = examples(100)
    config = TrainConfig(batch_size=10, max_batches=4, **DP).validated()

    def run(private_seed: int) -> dict:
        torch.manual_seed(0)
        model = Tiny()
        outcome = train_round(model, data, config, seed=3, private_seed=private_seed)
        assert outcome.private and outcome.num_examples == 40
        return outcome.state

    first, again, other = run(5), run(5), run(6)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first)
    torch.manual_seed(0)
    plain = train_round(Tiny(), data, TrainConfig(batch_size=10, max_batches=4), seed=3)
    assert not plain.private


def test_poisson_batches_sample_each_example_at_the_rate() -> None:
    sizes = [len(b) for b in privacy.poisson_batches(1000, 0.05, 400, torch.Generator().manual_seed(0))]
    assert abs(sum(sizes) / len(sizes) - 50) < 1.5  # std of the mean: sqrt(47.5 / 400) = 0.34
    assert len(set(sizes)) > 5


def test_a_worker_without_opacus_is_told_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "opacus", None)  # what an import of a missing package does
    with pytest.raises(privacy.PrivacyUnavailable, match="pip install 'opacus") as refused:
        privacy.require_library()
    assert refused.value.code.name == "FAILED_PRECONDITION"


# Central DP (coordinator/strategies/central_dp.py).

from coordinator.strategies.base import Contribution  # noqa: E402
from coordinator.strategies.central_dp import CentralDP, effective_noise  # noqa: E402
from coordinator.strategies.registry import StrategySpec  # noqa: E402


def deltas_of_norm(norms: list, size: int = 1000, seed: int = 0) -> list:
    generator = torch.Generator().manual_seed(seed)
    out = []
    for norm in norms:
        d = torch.randn(size, generator=generator, dtype=torch.float64)
        out.append({"w": (d / d.norm() * norm).reshape(10, 100)})
    return out


def test_central_dp_clips_each_update_and_means_over_the_expected_count() -> None:
    deltas = deltas_of_norm([10.0, 0.5, 3.0])
    agg = CentralDP(1e-9, 1.0, 1e-5, expected=3, fleet_size=3)
    out = agg(deltas, [100.0, 1.0, 1.0])  # example counts do not weigh: user-level
    factors = [0.1, 1.0, 1 / 3.0]
    expected = sum(d["w"] * f for d, f in zip(deltas, factors)) / 3
    torch.testing.assert_close(out["w"], expected, rtol=0, atol=1e-7)
    assert agg.note()["central_dp"]["clipped"] == 2


def test_central_dp_noise_on_the_mean_is_z_s_over_m() -> None:
    agg = CentralDP(2.0, 0.5, 1e-5, expected=4, fleet_size=40)
    zeros = [{"w": torch.zeros(200_000, dtype=torch.float64)}] * 4
    out = agg(zeros, [1.0] * 4)["w"]
    assert abs(float(out.std()) - 2.0 * 0.5 / 4) < 0.01 * 2.0 * 0.5 / 4  # 1%: over 6 standard errors


def test_central_dp_accounts_each_round_at_the_sampling_rate_and_survives_a_checkpoint() -> None:
    agg = CentralDP(1.0, 1.0, 1e-5, expected=10, fleet_size=100, target_quantile=0.5, quantile_noise=1.0)
    deltas = deltas_of_norm([0.2] * 10)
    for _ in range(3):
        agg(deltas, [1.0] * 10)
    note = agg.note()["central_dp"]
    assert note["epsilon"] == pytest.approx(privacy.epsilon_of([Spend(0, 1.0, 0.1, 3)], 1e-5))
    # Every norm within the clip: it shrinks toward the median (about exp(-0.2 * 0.5) a round).
    assert note["next_clip"] < note["clip"] < 1.0
    again = CentralDP(1.0, 1.0, 1e-5, expected=10, fleet_size=100, target_quantile=0.5, quantile_noise=1.0)
    again.load_state_dict(agg.state_dict())
    torch.testing.assert_close(agg(deltas, [1.0] * 10)["w"], again(deltas, [1.0] * 10)["w"], rtol=0, atol=0)
    assert again.note() == agg.note()


def test_adaptive_clipping_leaves_the_updates_the_noise_theorem_1_says() -> None:
    assert effective_noise(1.0, 10.0) == pytest.approx((1 - 1 / 400) ** -0.5)
    with pytest.raises(InvalidConfig, match="dp_quantile_noise"):
        StrategySpec("dp-fedavg", {"dp_quantile": 0.5}).build(fleet_size=3)


def test_dp_fedavg_is_a_strategy_with_a_server_optimizer() -> None:
    strategy = StrategySpec("fedavgm", {"aggregator": "dp-mean", "dp_noise": 0.5}).build(fleet_size=3)
    start = {"w": torch.zeros(10, 100)}
    contributions = [Contribution(f"w{i}", {"w": d["w"].float()}, 10) for i, d in enumerate(deltas_of_norm([5.0] * 3))]
    new = strategy.aggregate(start, contributions)
    assert new["w"].shape == (10, 100) and torch.isfinite(new["w"]).all()
    assert strategy.note()["central_dp"]["epsilon"] > 0


# jetfed simulate's in-process worker (coordinator/local_fleet.py) trains DP rounds as a board.


def test_a_simulated_worker_trains_dp_rounds_reports_epsilon_and_refuses_over_its_budget(tiny_mnist: Path) -> None:
    import asyncio
    from dataclasses import replace

    from coordinator.clients import Weights
    from coordinator.local_fleet import LocalTrainer, LocalWorker
    from jetfed.partitions import Partition
    from jetfed.tasks.base import TaskSettings
    from jetfed.tasks.mnist import MnistTask

    task = MnistTask(TaskSettings(data_dir=tiny_mnist, device=torch.device("cpu"), download=False))
    trainer = LocalTrainer(task, "cpu")
    data = task.load("train", Partition())
    worker = LocalWorker("w1", trainer, data)
    weights = Weights.of(task.build_model().state_dict(), task.model_name)
    config = TrainConfig(batch_size=32, max_batches=2, **DP).validated()
    try:
        first = asyncio.run(worker.train(1, config, weights, 60.0))
        second = asyncio.run(worker.train(2, config, weights, 60.0))
        spend = privacy.round_spend(1, config, len(data))
        assert first.epsilon == pytest.approx(privacy.epsilon_of([spend], 1e-5)) and first.delta == 1e-5
        assert second.epsilon == pytest.approx(privacy.epsilon_of([spend, spend], 1e-5))
        with pytest.raises(Exception, match="privacy budget spent") as refused:
            asyncio.run(worker.train(3, replace(config, epsilon_budget=second.epsilon), weights, 60.0))
        assert getattr(refused.value, "status", "") == "RESOURCE_EXHAUSTED"
    finally:
        trainer.close()


def test_the_coordinators_dp_flags_and_federation_keys_reach_the_train_config(tmp_path: Path) -> None:
    from coordinator import cli

    toml = tmp_path / "federation.toml"
    toml.write_text("[training]\ndp_noise_multiplier = 1.1\ndp_max_grad_norm = 0.5\ndp_delta = 1e-5\n")
    values = cli.parse_args(["--config", str(toml), "--worker", "a=127.0.0.1:1", "--dp-epsilon-budget", "3"])
    train = cli.settings_from(values).train
    assert (train.noise_multiplier, train.max_grad_norm, train.dp_delta, train.epsilon_budget) == (1.1, 0.5, 1e-5, 3.0)
    assert not cli.settings_from(cli.parse_args(["--worker", "a=127.0.0.1:1"])).train.private
    with pytest.raises(InvalidConfig, match="^dp_delta: "):
        cli.settings_from(cli.parse_args(["--worker", "a=127.0.0.1:1", "--dp-noise-multiplier", "1",
                                          "--dp-max-grad-norm", "1"])).validated()


def test_a_dp_run_gets_a_privacy_plot(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    import json as _json

    from coordinator.plots import main as plots_main
    from tests.unit.test_plots import png_size, round_record

    records = []
    for n in range(1, 7):
        record = round_record(n)
        record["privacy"] = {"delta": 1e-5, "epsilon": {"alice": 1 + 0.1 * n, "bob": 1 + 0.2 * n},
                             "max_epsilon": 1 + 0.2 * n}
        records.append(record)
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(_json.dumps(r) + "\n" for r in records))
    assert plots_main([str(run), "--out", str(tmp_path / "plots")]) == 0
    assert png_size(tmp_path / "plots" / "privacy.png") == (1080, 600)
    assert (tmp_path / "plots" / "privacy.png").stat().st_size > 20_000
    # A run without DP gets none.
    (run / "metrics.jsonl").write_text("".join(_json.dumps(round_record(n)) + "\n" for n in range(1, 4)))
    assert plots_main([str(run), "--out", str(tmp_path / "plain")]) == 0
    assert not (tmp_path / "plain" / "privacy.png").exists()
