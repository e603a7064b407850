"""Every strategy's arithmetic against cases worked by hand, the parts' contracts
(never mutating inputs, state that round-trips), and the registry's refusals."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from coordinator.settings import RunSettings
from coordinator.strategies.base import Contribution
from coordinator.strategies.registry import StrategySpec
from coordinator.strategies import aggregate
from coordinator.strategies.fedavg import fedavg
from coordinator.strategies.staleness import polynomial
from jetfed.errors import InvalidConfig


def state(*values: float) -> dict:
    return {"w": torch.tensor(values, dtype=torch.float32)}


def step(strategy, global_state, *updates, examples=None):
    examples = examples or [1] * len(updates)
    return strategy.aggregate(global_state, [Contribution(f"u{i}", u, n) for i, (u, n) in
                                             enumerate(zip(updates, examples))])


def build(name: str, **params):
    return StrategySpec(name, params).build()


def test_fedavg_is_todays_state_space_average_bit_for_bit() -> None:
    torch.manual_seed(0)
    g = {"w": torch.randn(1000), "n": torch.tensor(3)}
    ups = [{"w": g["w"] + torch.randn(1000) * 0.01, "n": torch.tensor(5 + i)} for i in range(3)]
    got = step(build("fedavg"), g, *ups, examples=[100, 200, 320])
    want = fedavg(ups, [100, 200, 320])
    assert torch.equal(got["w"], want["w"]) and torch.equal(got["n"], want["n"])


def test_fedavgm_two_rounds_by_hand() -> None:
    s = build("fedavgm", server_lr=0.5, momentum=0.5)
    g0 = state(0.0)
    g1 = step(s, g0, state(2.0), state(4.0))  # mean delta 3; m = 3; g = 0 + 0.5 * 3
    assert g1["w"].tolist() == [1.5]
    g2 = step(s, g1, state(2.5), state(2.5))  # delta 1; m = 0.5*3 + 1 = 2.5; g = 1.5 + 1.25
    assert g2["w"].tolist() == [2.75]


def test_fedavgm_nesterov_steps_with_the_next_rounds_momentum() -> None:
    s = build("fedavgm", server_lr=0.5, momentum=0.5, nesterov=1)
    g1 = step(s, state(0.0), state(2.0), state(4.0))  # d 3; m = 3; g = 0 + 0.5 * (0.5 * 3 + 3)
    assert g1["w"].tolist() == [2.25]
    g2 = step(s, g1, state(3.25), state(3.25))  # d 1; m = 2.5; g = 2.25 + 0.5 * (1.25 + 1)
    assert g2["w"].tolist() == [3.375]


def test_fedadam_one_step_by_hand() -> None:
    s = build("fedadam", server_lr=0.1, beta1=0.9, beta2=0.99, tau=0.001)
    g = step(s, state(1.0), state(1.5))  # d = .5; m = .05; v = .0025; 1 + .1 * .05 / (.05 + .001)
    assert g["w"].item() == pytest.approx(1.0 + 0.1 * 0.05 / 0.051, rel=1e-6)


def test_fedyogi_second_step_differs_from_adams_by_its_sign_rule() -> None:
    yogi, adam = (build(n, server_lr=0.1, beta1=0.0, beta2=0.5, tau=0.001) for n in ("fedyogi", "fedadam"))
    for s in (yogi, adam):
        g = step(s, state(0.0), state(1.0))  # d = 1: v = .5 for both
        assert g["w"].item() == pytest.approx(0.1 * 1 / (math.sqrt(0.5) + 0.001), rel=1e-6)
    # d = 0.1 next: adam v = .5*.5 + .5*.01 = .255; yogi v = .5 - .5*.01*sign(.5-.01) = .495
    gy = step(yogi, state(0.0), state(0.1))
    ga = step(adam, state(0.0), state(0.1))
    assert gy["w"].item() == pytest.approx(0.1 * 0.1 / (math.sqrt(0.495) + 0.001), rel=1e-6)
    assert ga["w"].item() == pytest.approx(0.1 * 0.1 / (math.sqrt(0.255) + 0.001), rel=1e-6)


def test_fedadagrad_accumulates_squares() -> None:
    s = build("fedadagrad", server_lr=1.0, beta1=0.0, tau=0.0001)
    step(s, state(0.0), state(3.0))  # v = 9
    g = step(s, state(0.0), state(4.0))  # v = 25; step = 4 / (5 + 1e-4)
    assert g["w"].item() == pytest.approx(4 / 5.0001, rel=1e-6)


def test_median_even_count_takes_the_mean_of_the_middle_pair() -> None:
    got = aggregate.coordinate_median([{"w": torch.tensor([1.0, 9.0])}, {"w": torch.tensor([2.0, -1.0])},
                                       {"w": torch.tensor([10.0, 3.0])}, {"w": torch.tensor([4.0, 5.0])}])
    assert got["w"].tolist() == [3.0, 4.0]


def test_median_strategy_ignores_an_outlier_and_the_claimed_examples() -> None:
    g = step(build("median"), state(0.0), state(1.0), state(2.0), state(1000.0), examples=[1, 1, 10**6])
    assert g["w"].tolist() == [2.0]


def test_trimmed_mean_drops_f_from_each_end() -> None:
    ds = [{"w": torch.tensor([v])} for v in (5.0, -100.0, 1.0, 3.0, 100.0)]
    assert aggregate.trimmed_mean(ds, 1)["w"].tolist() == [3.0]  # mean of 1, 3, 5
    assert aggregate.trimmed_mean(ds, 0)["w"].tolist() == [pytest.approx(1.8)]
    with pytest.raises(ValueError, match="more than 4"):
        aggregate.trimmed_mean(ds[:4], 2)


def test_krum_picks_the_honest_cluster_and_multi_krum_averages_it() -> None:
    honest = [{"w": torch.tensor([1.0, 1.0])}, {"w": torch.tensor([1.1, 0.9])}, {"w": torch.tensor([0.9, 1.1])},
              {"w": torch.tensor([1.0, 1.2])}]
    hostile = [{"w": torch.tensor([-50.0, 40.0])}]
    deltas = honest[:2] + hostile + honest[2:]
    # scores with f=1 (n - f - 2 = 2 neighbours): the hostile one is far from everyone
    scores = aggregate.krum_scores(deltas, 1)
    assert scores.index(max(scores)) == 2
    chosen = aggregate.multi_krum_selection(deltas, f=1, m=4)
    assert chosen == [0, 1, 3, 4]
    krum = aggregate.Krum(f=1, m=1)(deltas, [1.0] * 5)
    assert krum["w"].tolist() in [d["w"].tolist() for d in honest]
    multi = aggregate.Krum(f=1, m=0)(deltas, [1.0] * 5)  # m = n - f = 4: the honest mean
    assert multi["w"].tolist() == pytest.approx([1.0, 1.05])
    with pytest.raises(ValueError, match="at least 5"):
        aggregate.krum_scores(deltas[:4], 1)


def test_centered_clip_by_hand_and_its_center_is_state() -> None:
    deltas = [{"w": torch.tensor([0.0])}] * 3 + [{"w": torch.tensor([10.0])}]
    clip = aggregate.CenteredClip(f=1, tau=1.0, iterations=1)
    assert clip(deltas, [1.0] * 4)["w"].tolist() == [0.25]  # (0 + 0 + 0 + 1) / 4
    # the next round starts from 0.25: distances .25 (x3) and 9.75 -> (3 * -.25 + 1) / 4 added
    assert clip(deltas, [1.0] * 4)["w"].item() == pytest.approx(0.25 + (3 * -0.25 + 1.0) / 4)
    again = aggregate.CenteredClip(f=1, tau=1.0, iterations=1)
    again.load_state_dict(clip.state_dict())
    assert again(deltas, [1.0] * 4)["w"].item() == pytest.approx(clip(deltas, [1.0] * 4)["w"].item())


def test_integer_buffers_follow_the_mean_in_the_delta_path() -> None:
    g = {"w": torch.tensor([0.0]), "steps": torch.tensor(10)}
    ups = [{"w": torch.tensor([1.0]), "steps": torch.tensor(20)}, {"w": torch.tensor([3.0]), "steps": torch.tensor(31)}]
    got = step(build("fedavgm", server_lr=1.0), g, *ups)
    assert got["steps"].dtype == torch.int64 and got["steps"].item() == 26  # round(25.5) to even
    assert got["w"].item() == pytest.approx(2.0)


def test_no_strategy_mutates_its_inputs() -> None:
    for name in ("fedavg", "fedavgm", "fedadam", "median", "trimmed-mean", "multi-krum", "centered-clip"):
        torch.manual_seed(1)
        g = {"w": torch.randn(6)}
        ups = [{"w": torch.randn(6)} for _ in range(5)]
        copies = [{"w": u["w"].clone()} for u in ups], {"w": g["w"].clone()}
        step(build(name), g, *ups)
        assert all(torch.equal(u["w"], c["w"]) for u, c in zip(ups, copies[0])) and torch.equal(g["w"], copies[1]["w"])


@pytest.mark.parametrize("name", ["fedavgm", "fedadam", "fedyogi", "fedadagrad", "centered-clip"])
def test_state_round_trip_continues_the_same_steps(name: str) -> None:
    torch.manual_seed(2)
    rounds = [[{"w": torch.randn(4)} for _ in range(3)] for _ in range(4)]
    whole, first = build(name), build(name)
    g = g_first = {"w": torch.zeros(4)}
    for ups in rounds:
        g = step(whole, g, *ups)
    for ups in rounds[:2]:
        g_first = step(first, g_first, *ups)
    resumed = build(name)
    resumed.load_state_dict(*first.state_dict())
    for ups in rounds[2:]:
        g_first = step(resumed, g_first, *ups)
    assert torch.equal(g["w"], g_first["w"])


def test_staleness_weight() -> None:
    assert polynomial(0, 0.5) == 1.0
    assert polynomial(3, 0.5) == 0.5
    with pytest.raises(ValueError):
        polynomial(-1, 0.5)
    s = build("fedbuff", server_lr=1.0)
    g = s.aggregate(state(0.0), [Contribution("a", state(1.0), 1, 0, 0), Contribution("b", state(4.0), 1, 0, 3)])
    assert g["w"].item() == pytest.approx((1.0 * 1 + 4.0 * 0.5) / 2)  # FedBuff: the mean of discounted changes
    g = s.aggregate(state(0.0), [Contribution("a", state(1.0), 1, 0, 0, pace=0.5),
                                 Contribution("b", state(4.0), 1, 0, 3, pace=2.0)])
    assert g["w"].item() == pytest.approx((1.0 * 0.5 + 4.0 * 0.5 * 2.0) / 2)
    # without a staleness discount, a fresh update's pace still scales its change
    plain = build("fedbuff", server_lr=1.0, staleness_exponent=0.0)
    g = plain.aggregate(state(0.0), [Contribution("a", state(1.0), 1, pace=0.5), Contribution("b", state(4.0), 1,
                                                                                          pace=2.0)])
    assert g["w"].item() == pytest.approx((1.0 * 0.5 + 4.0 * 2.0) / 2)


def test_sampling_is_seeded_by_round_and_keeps_the_roster_order() -> None:
    s = StrategySpec("fedavg", {"sample": 3}).build(seed=7)
    names = [f"w{i:02d}" for i in range(20)]
    picked = s.select(5, names)
    assert len(picked) == 3 and picked == sorted(picked) and picked == s.select(5, names)
    assert any(s.select(r, names) != picked for r in range(6, 12))
    assert build("fedavg").select(5, names) == names


def test_registry_refusals_name_the_fix() -> None:
    with pytest.raises(InvalidConfig, match="known: fedavg, fedavgm"):
        StrategySpec("fedavgn").resolved()
    with pytest.raises(InvalidConfig, match="unknown parameter 'momentum'; it takes"):
        StrategySpec("fedavg", {"momentum": 0.9}).resolved()
    with pytest.raises(InvalidConfig, match="momentum = 1.5 must be in"):
        StrategySpec("fedavgm", {"momentum": 1.5}).resolved()
    with pytest.raises(InvalidConfig, match="must be an integer"):
        StrategySpec("median", {"f": "two"}).resolved()
    # parts compose: a robust FedAdam takes both parts' parameters
    robust = StrategySpec("fedadam", {"aggregator": "median", "f": "2", "beta2": 0.999}).resolved()
    assert robust["aggregator"] == "median" and robust["f"] == 2 and robust["beta2"] == 0.999


def test_a_robust_rule_refuses_a_quorum_that_cannot_hold_it() -> None:
    workers = {f"w{i}": f"h:{i}" for i in range(10)}
    with pytest.raises(InvalidConfig, match="only with 7 updates or more per round, and this run's quorum is 6: "
                                            "give --min-workers 7"):
        RunSettings(workers=workers, evaluator=None, out_dir=Path("."), strategy=StrategySpec("krum", {"f": 2})
                    ).validated()
    RunSettings(workers=workers, evaluator=None, out_dir=Path("."), min_workers=7,
                strategy=StrategySpec("krum", {"f": 2})).validated()
    sampled = RunSettings(workers=workers, evaluator=None, out_dir=Path("."), strategy=StrategySpec("fedavg", {"sample": 4}))
    assert sampled.validated().quorum == 3


def test_scaffold_control_variate_by_hand() -> None:
    from coordinator.strategies.scaffold import sgd_steps
    from jetfed.config import TrainConfig

    s = StrategySpec("scaffold").build(fleet_size=2)
    recipe = s.configure(1, TrainConfig(lr=0.1, batch_size=10, max_batches=2))
    assert recipe.scaffold and sgd_steps(20, recipe) == 2
    assert s.companions(state(0.0)) == {"control/w": torch.tensor([0.0])}
    g = s.aggregate(state(0.0), [Contribution("a", state(-0.5), 20)])
    assert g["w"].tolist() == [-0.5]
    # delta_c = -c - delta_y / (K lr) = 0 + 0.5 / 0.2 = 2.5; c += |S|/N * mean = 1/2 * 2.5
    assert s.companions(g)["control/w"].tolist() == [1.25]
    s.configure(2, TrainConfig(lr=0.1, batch_size=10, max_batches=2))
    s.aggregate(g, [Contribution("a", state(-0.5), 20), Contribution("b", state(-0.1), 20)])
    # delta_c: a: -1.25 - 0 / 0.2 = -1.25; b: -1.25 - 0.4 / 0.2 = -3.25; c += 2/2 * mean = -2.25
    assert s.companions(g)["control/w"].item() == pytest.approx(1.25 - 2.25)
    resumed = StrategySpec("scaffold").build(fleet_size=2)
    resumed.load_state_dict(*s.state_dict())
    assert torch.equal(resumed.companions(g)["control/w"], s.companions(g)["control/w"])


def test_scaffold_takes_a_server_optimizer_but_not_another_aggregate() -> None:
    from coordinator.strategies.scaffold import Scaffold
    from jetfed.config import TrainConfig

    s = StrategySpec("scaffold", {"server_optimizer": "momentum", "server_lr": 0.5, "momentum": 0.5}).build(
        fleet_size=1)
    s.configure(1, TrainConfig(lr=0.1, batch_size=10, max_batches=2))
    g1 = s.aggregate(state(0.0), [Contribution("a", state(2.0), 20)])  # m = 2; g = 1
    g2 = s.aggregate(g1, [Contribution("a", state(2.0), 20)])  # d 1; m = 2; g = 1 + 1
    assert (g1["w"].tolist(), g2["w"].tolist()) == ([1.0], [2.0])
    # c follows each worker's own update, not the server's step: delta_c = -c - d / (K lr);
    # round 1: 0 - 2 / 0.2 = -10, c = -10; round 2: 10 - 1 / 0.2 = 5, c = -5
    assert s.companions(g2)["control/w"].item() == pytest.approx(-5.0)
    # scaffoldm is that composition as a preset, at its measured defaults
    preset = StrategySpec("scaffoldm")
    assert isinstance(preset.build(), Scaffold) and preset.resolved() == StrategySpec(
        "scaffold", {"server_optimizer": "momentum", "server_lr": 1.6, "momentum": 0.6}).resolved()
    with pytest.raises(InvalidConfig, match="unknown parameter 'aggregator'"):
        StrategySpec("scaffold", {"aggregator": "median"}).resolved()
    with pytest.raises(InvalidConfig, match="unknown parameter 'mu'"):
        StrategySpec("scaffold", {"mu": 0.1}).resolved()
