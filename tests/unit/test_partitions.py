"""Partitions: disjoint, complete and reproducible, whatever the labels, n, alpha or seed."""

from __future__ import annotations

import math
import time
from typing import List

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from jetfed.errors import InvalidConfig
from jetfed.partitions import Partition, parse_shard, partition_from_flags


def parts(targets: torch.Tensor, classes: int, count: int, alpha=None, seed: int = 0, labels=None) -> List[torch.Tensor]:
    return [Partition(labels=labels, shard=(i, count), dirichlet=alpha, seed=seed).indices(targets, classes)
            for i in range(1, count + 1)]


def check_cover(pieces: List[torch.Tensor], expected: torch.Tensor) -> None:
    joined = torch.cat(pieces)
    assert len(joined) == len(set(joined.tolist())), "parts overlap"
    assert sorted(joined.tolist()) == sorted(expected.tolist()), "parts miss examples or add some"
    for piece in pieces:
        assert piece.tolist() == sorted(piece.tolist())


targets_strategy = st.integers(2, 12).flatmap(
    lambda classes: st.tuples(st.just(classes), st.lists(st.integers(0, classes - 1), min_size=20, max_size=400)))


@settings(max_examples=60, deadline=None)
@given(targets_strategy, st.integers(1, 8), st.integers(0, 2**32))
def test_iid_shards_are_disjoint_complete_reproducible_and_even(data, count, seed) -> None:
    classes, values = data
    targets = torch.tensor(values)
    pieces = parts(targets, classes, count, seed=seed)
    check_cover(pieces, torch.arange(len(targets)))
    sizes = [len(p) for p in pieces]
    assert max(sizes) - min(sizes) <= 1
    assert [p.tolist() for p in parts(targets, classes, count, seed=seed)] == [p.tolist() for p in pieces]


@settings(max_examples=60, deadline=None)
@given(targets_strategy, st.integers(1, 6), st.floats(0.05, 1000), st.integers(0, 2**32))
def test_dirichlet_parts_are_disjoint_complete_and_reproducible(data, count, alpha, seed) -> None:
    classes, values = data
    targets = torch.tensor(values)
    try:
        pieces = parts(targets, classes, count, alpha, seed)
    except InvalidConfig as exc:  # an empty part is refused, naming the fix
        assert "holds no examples" in str(exc)
        return
    check_cover(pieces, torch.arange(len(targets)))
    assert [p.tolist() for p in parts(targets, classes, count, alpha, seed)] == [p.tolist() for p in pieces]


@settings(max_examples=40, deadline=None)
@given(targets_strategy, st.integers(1, 5), st.integers(0, 1000))
def test_labels_filter_first_then_split(data, count, seed) -> None:
    classes, values = data
    targets = torch.tensor(values)
    labels = frozenset(range(0, classes, 2))
    expected = torch.tensor([i for i, t in enumerate(values) if t in labels], dtype=torch.int64)
    if count > len(expected):
        with pytest.raises(InvalidConfig, match="at most"):
            parts(targets, classes, count, seed=seed, labels=labels)
        return
    check_cover(parts(targets, classes, count, seed=seed, labels=labels), expected)


def test_another_seed_gives_another_split() -> None:
    targets = torch.arange(1000) % 10
    assert parts(targets, 10, 4, seed=1)[0].tolist() != parts(targets, 10, 4, seed=2)[0].tolist()
    assert parts(targets, 10, 4, 0.5, seed=1)[0].tolist() != parts(targets, 10, 4, 0.5, seed=2)[0].tolist()


def entropy(targets: torch.Tensor, classes: int) -> float:
    counts = torch.bincount(targets, minlength=classes).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log()).sum())


def test_small_alpha_is_skewed_large_alpha_is_nearly_iid() -> None:
    targets = torch.arange(6000) % 10

    def mean_entropy(alpha: float) -> float:
        return sum(entropy(targets[p], 10) for p in parts(targets, 10, 10, alpha, seed=3)) / 10

    skewed, even = mean_entropy(0.1), mean_entropy(100.0)
    assert skewed < 0.6 * even
    assert even > 0.95 * math.log(10)


def test_sixty_thousand_labels_in_a_hundred_parts_is_fast() -> None:
    targets = torch.randint(0, 10, (60000,), generator=torch.Generator().manual_seed(0))
    started = time.perf_counter()
    check_cover(parts(targets, 10, 100, seed=5), torch.arange(60000))
    check_cover(parts(targets, 10, 10, 0.5, seed=5), torch.arange(60000))
    assert time.perf_counter() - started < 10  # each worker computes one part: 1/100 of this


@pytest.mark.parametrize("spec, message", [
    ("0/10", "numbered 1..10"), ("11/10", "numbered 1..10"), ("3-10", "write i/n"), ("a/3", "write i/n"),
    ("1/0", "write i/n"),
])
def test_bad_shard_names_the_fix(spec: str, message: str) -> None:
    with pytest.raises(InvalidConfig, match=message):
        parse_shard(spec)


def test_flags_are_checked() -> None:
    with pytest.raises(InvalidConfig, match="add --shard"):
        partition_from_flags("all", None, 0.5, 0, 10)
    for alpha in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(InvalidConfig, match="positive"):
            partition_from_flags("all", "1/2", alpha, 0, 10)
    with pytest.raises(InvalidConfig, match="partition-seed"):
        partition_from_flags("all", "1/2", None, -1, 10)
    with pytest.raises(InvalidConfig, match="at most 3 parts"):
        Partition(shard=(1, 4)).indices(torch.tensor([0, 1, 2]), 3)
    assert partition_from_flags("all", None, None, 0, 10).is_everything()
    assert partition_from_flags("0-3,7", "2/5", 0.3, 9, 10).describe() == \
        "labels 0-3,7, shard 2/5 (Dirichlet(0.3), seed 9)"


def test_an_empty_dirichlet_part_is_refused_with_the_fix() -> None:
    targets = torch.zeros(12, dtype=torch.int64)  # one class: tiny alpha leaves most parts empty
    with pytest.raises(InvalidConfig, match="larger --dirichlet or another --partition-seed"):
        parts(targets, 1, 12, 0.01, seed=0)
