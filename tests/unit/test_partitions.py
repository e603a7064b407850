from __future__ import annotations

import argparse
import math
import time
from typing import Iterator, List, Optional, Tuple

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from jetfed.errors import InvalidConfig
from jetfed.partitions import Partition, add_partition_arguments, parse_shard, partition_from_flags

PROPERTIES = settings(max_examples=60, deadline=None)


@st.composite
def splits(draw, min_size: int = 1) -> Tuple[torch.Tensor, int, Optional[frozenset]]:
    """A split's labels, its number of classes, and a label filter (None or a non-empty
    set of classes) that keeps at least `min_size` examples."""
    num_classes = draw(st.integers(1, 12))
    targets = draw(st.lists(st.integers(0, num_classes - 1), min_size=min_size, max_size=400))
    labels = draw(st.none() | st.frozensets(st.sampled_from(sorted(set(targets))), min_size=1))
    tensor = torch.tensor(targets, dtype=torch.int64)
    assume(len(kept_by(tensor, labels)) >= min_size)
    return tensor, num_classes, labels


def kept_by(targets: torch.Tensor, labels: Optional[frozenset]) -> List[int]:
    return [index for index, label in enumerate(targets.tolist()) if labels is None or label in labels]


def all_parts(
    targets: torch.Tensor, num_classes: int, labels: Optional[frozenset], n: int, alpha: Optional[float], seed: int
) -> List[List[int]]:
    """Every part of the split, [] for a part that `indices` refuses as empty."""
    parts = []
    for i in range(1, n + 1):
        try:
            part = Partition(labels=labels, shard=(i, n), dirichlet=alpha, seed=seed).indices(targets, num_classes)
        except InvalidConfig as exc:
            assert alpha is not None and "holds no example" in str(exc)
            part = torch.zeros(0, dtype=torch.int64)
        assert part.dtype == torch.int64
        assert part.tolist() == sorted(part.tolist())
        parts.append(part.tolist())
    return parts


alphas = st.none() | st.sampled_from([0.01, 0.1, 0.5, 1.0, 3.0, 100.0]) | st.floats(0.05, 50)
seeds = st.integers(0, 2**63 - 1)


@PROPERTIES
@given(split=splits(), data=st.data(), alpha=alphas, seed=seeds)
def test_parts_are_disjoint_and_cover_the_filtered_split(split, data, alpha, seed):
    targets, num_classes, labels = split
    kept = kept_by(targets, labels)
    n = data.draw(st.integers(1, min(len(kept), 30)), label="n")
    parts = all_parts(targets, num_classes, labels, n, alpha, seed)
    flat = [index for part in parts for index in part]
    assert len(flat) == len(set(flat))
    assert sorted(flat) == kept


@PROPERTIES
@given(split=splits(), data=st.data(), alpha=alphas, seed=seeds)
def test_parts_are_reproducible(split, data, alpha, seed):
    targets, num_classes, labels = split
    n = data.draw(st.integers(1, min(len(kept_by(targets, labels)), 30)), label="n")
    assert all_parts(targets, num_classes, labels, n, alpha, seed) == all_parts(
        targets.clone(), num_classes, labels, n, alpha, seed
    )


@PROPERTIES
@given(split=splits(min_size=40), data=st.data(), alpha=st.none() | st.floats(1.0, 100.0), seed=seeds)
def test_another_seed_gives_another_split(split, data, alpha, seed):
    targets, num_classes, labels = split
    n = data.draw(st.integers(2, 10), label="n")
    ours = all_parts(targets, num_classes, labels, n, alpha, seed)
    others = [all_parts(targets, num_classes, labels, n, alpha, (seed + k) % 2**63) for k in (1, 2, 3)]
    assert any(other != ours for other in others)


@PROPERTIES
@given(split=splits(), data=st.data(), seed=seeds)
def test_iid_shards_are_near_equal_like_array_split(split, data, seed):
    targets, num_classes, labels = split
    kept = len(kept_by(targets, labels))
    n = data.draw(st.integers(1, min(kept, 30)), label="n")
    sizes = [len(part) for part in all_parts(targets, num_classes, labels, n, None, seed)]
    base, extra = divmod(kept, n)
    assert sizes == [base + 1] * extra + [base] * (n - extra)


def mean_label_entropy(parts: List[List[int]], targets: torch.Tensor, num_classes: int) -> float:
    entropies = []
    for part in parts:
        if not part:
            continue
        counts = torch.bincount(targets[part], minlength=num_classes).double()
        p = counts[counts > 0] / counts.sum()
        entropies.append(float(-(p * p.log()).sum()))
    return sum(entropies) / len(entropies)


@settings(PROPERTIES, max_examples=20)
@given(seed=seeds, n=st.integers(5, 12), num_classes=st.integers(4, 10))
def test_small_alpha_skews_labels_more_than_large_alpha(seed, n, num_classes):
    """Over five parts or more (with two, chance alone often mixes both parts well)."""
    targets = torch.arange(2000) % num_classes
    skewed = mean_label_entropy(all_parts(targets, num_classes, None, n, 0.1, seed), targets, num_classes)
    even = mean_label_entropy(all_parts(targets, num_classes, None, n, 100.0, seed), targets, num_classes)
    assert even > 0.95 * math.log(num_classes)
    assert skewed < 0.8 * even


def test_parts_are_pinned_across_versions():
    """The split must not drift with the torch or Python on a board: workers with other
    versions would otherwise get overlapping parts."""
    targets = torch.arange(40) % 4
    assert Partition(shard=(2, 3), seed=7).indices(targets, 4).tolist() == PINNED_IID
    assert Partition(shard=(2, 3), dirichlet=0.5, seed=7).indices(targets, 4).tolist() == PINNED_DIRICHLET
    assert Partition(shard=(2, 3), dirichlet=2.0, seed=7).indices(targets, 4).tolist() == PINNED_DIRICHLET_LARGE_ALPHA
    assert Partition(labels=frozenset({1, 2}), shard=(1, 2), seed=0).indices(targets, 4).tolist() == PINNED_LABELS


PINNED_IID = [0, 3, 8, 11, 16, 17, 20, 21, 25, 27, 32, 33, 34]
PINNED_DIRICHLET = [1, 3, 5, 7, 11, 13, 14, 15, 17, 19, 21, 23, 24, 27, 28, 31, 33, 35, 37]
PINNED_DIRICHLET_LARGE_ALPHA = [3, 5, 6, 7, 13, 16, 21, 27, 30, 31, 33, 35, 38]
PINNED_LABELS = [6, 9, 10, 13, 14, 18, 26, 29, 34, 38]


def test_labels_only_keeps_those_classes_in_order():
    targets = torch.tensor([3, 0, 1, 3, 2, 0])
    assert Partition(labels=frozenset({0, 3})).indices(targets, 4).tolist() == [0, 1, 3, 5]
    assert Partition().indices(targets, 4).tolist() == list(range(6))


@pytest.mark.parametrize(
    "partition, text",
    [
        (Partition(), "all"),
        (Partition(labels=frozenset({0, 1, 2, 3})), "labels 0-3"),
        (Partition(labels=frozenset({0, 1, 2, 3, 7, 9})), "labels 0-3,7,9"),
        (Partition(shard=(3, 10)), "shard 3/10 (IID, seed 0)"),
        (Partition(shard=(3, 10), dirichlet=0.5), "shard 3/10 of Dirichlet(0.5), seed 0"),
        (Partition(labels=frozenset({4, 5}), shard=(1, 2), seed=9), "labels 4-5, shard 1/2 (IID, seed 9)"),
    ],
)
def test_describe(partition, text):
    assert partition.describe() == text


def test_is_everything():
    assert Partition().is_everything()
    assert Partition(shard=(1, 1)).is_everything()
    assert not Partition(shard=(1, 2)).is_everything()
    assert not Partition(labels=frozenset({0})).is_everything()


def parse(argv: List[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_partition_arguments(parser)
    return parser.parse_args(argv)


def test_flags_build_the_partition():
    args = parse([])
    assert (args.labels, args.shard, args.dirichlet, args.partition_seed) == ("all", None, None, 0)
    assert partition_from_flags(args.labels, args.shard, args.dirichlet, args.partition_seed, 10).is_everything()
    args = parse(["--labels", "0-3", "--shard", "3/10", "--dirichlet", "0.5", "--partition-seed", "4"])
    partition = partition_from_flags(args.labels, args.shard, args.dirichlet, args.partition_seed, 10)
    assert partition == Partition(labels=frozenset({0, 1, 2, 3}), shard=(3, 10), dirichlet=0.5, seed=4)


def test_labels_that_cover_every_class_are_no_filter():
    assert partition_from_flags("0-9", None, None, 0, 10) == Partition()


@pytest.mark.parametrize("spec, shard", [("3/10", (3, 10)), (" 1 / 1 ", (1, 1)), ("10/10", (10, 10))])
def test_parse_shard(spec, shard):
    assert parse_shard(spec) == shard


@pytest.mark.parametrize(
    "spec, message",
    [
        ("0/10", r"^--shard 0/10: shards are numbered 1\.\.n; use 1/10 to 10/10$"),
        ("11/10", r"^--shard 11/10: shards are numbered 1\.\.n; use 1/10 to 10/10$"),
        ("1/0", r"^--shard 1/0: n .* at least 1"),
        ("1/-2", r"^--shard 1/-2: n .* at least 1"),
        ("3-10", r"^--shard '3-10': cannot read it; write i/n .* like 3/10"),
        ("1.5/10", r"^--shard '1.5/10': cannot read it; write i/n with whole numbers"),
        ("a/10", r"^--shard 'a/10': cannot read"),
        ("3/", r"^--shard '3/': cannot read"),
        ("1/2/3", r"^--shard '1/2/3': cannot read"),
        ("", r"^--shard '': cannot read"),
    ],
)
def test_parse_shard_refuses(spec, message):
    with pytest.raises(InvalidConfig, match=message):
        parse_shard(spec)


def test_more_shards_than_examples_is_refused():
    with pytest.raises(InvalidConfig, match=r"^--shard 2/5: 5 parts of 3 examples would leave .* choose n at most 3$"):
        Partition(shard=(2, 5)).indices(torch.tensor([0, 1, 2]), 3)
    with pytest.raises(InvalidConfig, match=r"^--shard 1/3: 3 parts of 2 examples \(what --labels 1 keeps\)"):
        Partition(labels=frozenset({1}), shard=(1, 3)).indices(torch.tensor([0, 1, 1, 2]), 3)


@pytest.mark.parametrize("alpha", [0.0, -1.0, float("nan"), float("inf")])
def test_dirichlet_alpha_must_be_finite_and_positive(alpha):
    with pytest.raises(InvalidConfig, match=r"^--dirichlet .*: alpha must be a finite number above 0"):
        Partition(shard=(1, 2), dirichlet=alpha)
    with pytest.raises(InvalidConfig, match=r"^--dirichlet "):
        partition_from_flags("all", "1/2", alpha, 0, 10)


def test_dirichlet_needs_a_shard():
    with pytest.raises(InvalidConfig, match=r"^--dirichlet 0.5 needs --shard i/n"):
        partition_from_flags("all", None, 0.5, 0, 10)


@pytest.mark.parametrize("seed", [-1, 2**63, 1.5])
def test_seed_must_be_a_whole_number_in_range(seed):
    with pytest.raises(InvalidConfig, match=r"^--partition-seed .*: use a whole number from 0 to 2\*\*63-1$"):
        Partition(shard=(1, 2), seed=seed)


def test_an_empty_dirichlet_part_names_part_alpha_and_seed():
    targets = torch.arange(1000) % 10
    refusals = []
    for i in range(1, 21):
        try:
            Partition(shard=(i, 20), dirichlet=0.001, seed=5).indices(targets, 10)
        except InvalidConfig as exc:
            refusals.append((i, str(exc)))
    assert refusals, "alpha 0.001 over 20 parts of 10 classes should leave some part empty"
    i, message = refusals[0]
    assert message == (
        f"--shard {i}/20 of --dirichlet 0.001 with --partition-seed 5: part {i} holds no example; "
        "choose a larger alpha or another seed"
    )


def test_labels_outside_the_classes_are_refused():
    with pytest.raises(InvalidConfig, match=r"^labels: \[10\] outside 0\.\.9"):
        partition_from_flags("7-10", None, None, 0, 10)
    with pytest.raises(InvalidConfig, match=r"^--labels 3: \[3\] outside 0\.\.2$"):
        Partition(labels=frozenset({3})).indices(torch.tensor([0, 1]), 3)


def test_labels_that_keep_nothing_are_refused():
    with pytest.raises(InvalidConfig, match=r"^--labels 2: none of the split's 3 examples has these labels"):
        Partition(labels=frozenset({2})).indices(torch.tensor([0, 1, 1]), 3)
    with pytest.raises(InvalidConfig, match=r"^--labels 2: none of the split's 3 examples"):
        Partition(labels=frozenset({2}), shard=(1, 2)).indices(torch.tensor([0, 1, 1]), 3)


@pytest.mark.parametrize(
    "targets, message",
    [
        (torch.zeros(2, 2, dtype=torch.int64), "1-D integer tensor"),
        (torch.zeros(3), "1-D integer tensor"),
        (torch.tensor([0, 3]), r"outside 0\.\.2"),
        (torch.tensor([-1, 0]), r"outside 0\.\.2"),
    ],
)
def test_targets_must_be_labels(targets, message):
    with pytest.raises(ValueError, match=message):
        Partition().indices(targets, 3)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """The bound is on the algorithm (no per-example Python); on a crowded two-core box
    torch's intra-op threads spin for tens of milliseconds per op instead."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("alpha", [None, 0.5])
def test_ten_shards_of_sixty_thousand_take_under_a_second(one_thread, alpha):
    targets = torch.randint(0, 10, (60_000,), generator=torch.Generator().manual_seed(0))
    best = math.inf
    for _ in range(3):
        start = time.perf_counter()
        parts = [Partition(shard=(i, 10), dirichlet=alpha).indices(targets, 10) for i in range(1, 11)]
        best = min(best, time.perf_counter() - start)
    assert sum(len(part) for part in parts) == 60_000
    assert best < 1.0
