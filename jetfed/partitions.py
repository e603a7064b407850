"""Which slice of a data set's train split each worker keeps.

A worker names its slice with flags: `--labels` keeps some classes, `--shard i/n` then
splits what remains into n parts and keeps part i, IID by default or non-IID with
`--dirichlet ALPHA` (the usual benchmark split: each class is dealt to the n parts in
proportions drawn from Dirichlet(alpha); a small alpha gives each part few classes, a
large one approaches IID). Every part is computed from the split's labels and
`--partition-seed` alone, so n workers that share the flags but `i` get disjoint parts
whose union is the whole label-filtered split, on any board, run after run.
"""

from __future__ import annotations

import argparse
import math
import random
from dataclasses import dataclass
from typing import FrozenSet, List, Optional, Tuple

import torch

from jetfed.data import parse_labels
from jetfed.errors import InvalidConfig

MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class Partition:
    """Which examples of a split this board keeps: the classes in `labels` (None: every
    class), then, with `shard` (i, n), part i of n of those, IID or, with `dirichlet`
    alpha, label-skewed. Checked when built; `indices` checks what needs the split."""

    labels: Optional[FrozenSet[int]] = None
    shard: Optional[Tuple[int, int]] = None
    dirichlet: Optional[float] = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.labels is not None:
            object.__setattr__(self, "labels", frozenset(self.labels))
            if not self.labels:
                raise InvalidConfig("--labels: keeps no class; name at least one, like 0-3, or use all")
        if self.shard is not None:
            object.__setattr__(self, "shard", tuple(self.shard))
            _check_shard(*self.shard)
        if self.dirichlet is not None:
            if not (math.isfinite(self.dirichlet) and self.dirichlet > 0):
                raise InvalidConfig(
                    f"--dirichlet {self.dirichlet}: alpha must be a finite number above 0, "
                    "like 0.1 (each part holds few classes) or 100 (close to IID)"
                )
            if self.shard is None:
                raise InvalidConfig(
                    f"--dirichlet {self.dirichlet} needs --shard i/n to say which of the n parts this worker keeps"
                )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed <= MAX_SEED:
            raise InvalidConfig(f"--partition-seed {self.seed!r}: use a whole number from 0 to 2**63-1")

    def indices(self, targets: torch.Tensor, num_classes: int) -> torch.Tensor:
        """int64 indices into the split (ascending order) of the examples this partition
        keeps, given the split's labels `targets` (1-D, each in 0..num_classes-1)."""
        targets = _checked_targets(targets, num_classes)
        kept = torch.arange(len(targets), dtype=torch.int64)
        if self.labels is not None:
            outside = sorted(label for label in self.labels if not 0 <= label < num_classes)
            if outside:
                raise InvalidConfig(f"--labels {_format_labels(self.labels)}: {outside} outside 0..{num_classes - 1}")
            wanted = torch.zeros(num_classes, dtype=torch.bool)
            wanted[sorted(self.labels)] = True
            kept = kept[wanted[targets]]
            if len(kept) == 0:
                raise InvalidConfig(
                    f"--labels {_format_labels(self.labels)}: none of the split's {len(targets)} examples has these "
                    "labels; choose other labels"
                )
        if self.shard is None:
            return kept
        i, n = self.shard
        if n > len(kept):
            raise InvalidConfig(
                f"--shard {i}/{n}: {n} parts of {len(kept)} examples{self._kept_from()} would leave parts empty; "
                f"choose n at most {len(kept)}"
            )
        if self.dirichlet is None:
            part = _iid_part(kept, i, n, self.seed)
        else:
            part = _dirichlet_part(kept, targets[kept], num_classes, i, n, self.dirichlet, self.seed)
            if len(part) == 0:
                raise InvalidConfig(
                    f"--shard {i}/{n} of --dirichlet {self.dirichlet:g} with --partition-seed {self.seed}: "
                    f"part {i} holds no example; choose a larger alpha or another seed"
                )
        return torch.sort(part).values

    def describe(self) -> str:
        """One line for logs and reports, e.g. `labels 0-3, shard 3/10 (IID, seed 0)`."""
        words = []
        if self.labels is not None:
            words.append(f"labels {_format_labels(self.labels)}")
        if self.shard is not None:
            i, n = self.shard
            if self.dirichlet is None:
                words.append(f"shard {i}/{n} (IID, seed {self.seed})")
            else:
                words.append(f"shard {i}/{n} of Dirichlet({self.dirichlet:g}), seed {self.seed}")
        return ", ".join(words) or "all"

    def is_everything(self) -> bool:
        """Whether every example of any split is kept (no label filter, at most one part)."""
        return self.labels is None and (self.shard is None or self.shard[1] == 1)

    def _kept_from(self) -> str:
        return "" if self.labels is None else f" (what --labels {_format_labels(self.labels)} keeps)"


def parse_shard(spec: str) -> Tuple[int, int]:
    """`3/10` -> (3, 10): part 3 of 10, parts counted from 1."""
    try:
        i, n = (int(x) for x in spec.split("/"))
    except ValueError:
        raise InvalidConfig(
            f"--shard {spec!r}: cannot read it; write i/n with whole numbers, like 3/10 for the third of ten parts"
        ) from None
    _check_shard(i, n)
    return i, n


def partition_from_flags(
    labels: str, shard: Optional[str], dirichlet: Optional[float], seed: int, num_classes: int
) -> Partition:
    """The partition that `add_partition_arguments`' flags name; `--labels` that cover
    every class count as no filter."""
    kept_labels: Optional[FrozenSet[int]] = parse_labels(labels, num_classes)
    if kept_labels == frozenset(range(num_classes)):
        kept_labels = None
    return Partition(
        labels=kept_labels,
        shard=None if shard is None else parse_shard(shard),
        dirichlet=dirichlet,
        seed=seed,
    )


def add_partition_arguments(parser: argparse.ArgumentParser) -> None:
    """--labels, --shard, --dirichlet and --partition-seed; read them back with
    `partition_from_flags(args.labels, args.shard, args.dirichlet, args.partition_seed, ...)`."""
    parser.add_argument("--labels", default="all", help="labels this worker holds: 0-3, 4,5,6 or all (default)")
    parser.add_argument(
        "--shard",
        metavar="I/N",
        help="keep part I of N of the (label-filtered) train split, e.g. 3/10; the N workers of a run "
        "pass the same N and seed and I from 1 to N, and get disjoint parts that cover the split",
    )
    parser.add_argument(
        "--dirichlet",
        type=float,
        metavar="ALPHA",
        help="deal each class to the N parts of --shard in proportions drawn from Dirichlet(ALPHA) "
        "instead of IID: 0.1 gives each part few classes, 100 is close to IID",
    )
    parser.add_argument(
        "--partition-seed",
        type=int,
        default=0,
        metavar="N",
        help="seed of the --shard and --dirichlet split; every worker of a run passes the same (default 0)",
    )


def _check_shard(i: int, n: int) -> None:
    if n < 1:
        raise InvalidConfig(f"--shard {i}/{n}: n is the number of parts and must be at least 1, like 3/10")
    if not 1 <= i <= n:
        raise InvalidConfig(f"--shard {i}/{n}: shards are numbered 1..n; use 1/{n} to {n}/{n}")


def _checked_targets(targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    if targets.dim() != 1 or targets.dtype.is_floating_point or targets.dtype.is_complex:
        raise ValueError(f"targets must be a 1-D integer tensor of labels, not {targets.dtype} {tuple(targets.shape)}")
    targets = targets.to(device="cpu", dtype=torch.int64)
    if len(targets) and not (0 <= int(targets.min()) and int(targets.max()) < num_classes):
        raise ValueError(f"targets hold labels outside 0..{num_classes - 1}")
    return targets


def _iid_part(kept: torch.Tensor, i: int, n: int, seed: int) -> torch.Tensor:
    """Chunk i-1 of n near-equal chunks (the first len % n one longer) of a seeded shuffle."""
    shuffled = kept[torch.randperm(len(kept), generator=torch.Generator().manual_seed(seed))]
    base, extra = divmod(len(kept), n)
    start = (i - 1) * base + min(i - 1, extra)
    return shuffled[start : start + base + (1 if i - 1 < extra else 0)]


def _dirichlet_part(
    kept: torch.Tensor, kept_targets: torch.Tensor, num_classes: int, i: int, n: int, alpha: float, seed: int
) -> torch.Tensor:
    """Part i's share of every class: each class is shuffled and cut at the rounded
    cumulative proportions of its own Dirichlet draw, seeded by (seed, class) only."""
    by_class = kept[torch.sort(kept_targets, stable=True).indices]
    counts = torch.bincount(kept_targets, minlength=num_classes).tolist()
    pieces = []
    start = 0
    for label, count in enumerate(counts):
        if count == 0:
            continue
        members = by_class[start : start + count]
        start += count
        rng = random.Random(f"{seed}/{label}")
        cuts = _cuts(_dirichlet(rng, alpha, n), count)
        order = torch.randperm(count, generator=torch.Generator().manual_seed(rng.getrandbits(63)))
        pieces.append(members[order[cuts[i - 1] : cuts[i]]])
    return torch.cat(pieces)


def _dirichlet(rng: random.Random, alpha: float, n: int) -> List[float]:
    """A draw from the symmetric Dirichlet(alpha) over n parts."""
    if alpha >= 1:
        draws = [rng.gammavariate(alpha, 1.0) for _ in range(n)]
        total = sum(draws)
        return [draw / total for draw in draws]
    # Below 1 a Gamma(alpha) draw underflows to 0.0 often (always, for alpha near 0.001),
    # so work with logs: Gamma(alpha) = Gamma(alpha + 1) * U ** (1 / alpha).
    logs = [math.log(rng.gammavariate(alpha + 1.0, 1.0)) + math.log(1.0 - rng.random()) / alpha for _ in range(n)]
    top = max(logs)
    weights = [math.exp(log - top) for log in logs]
    total = sum(weights)
    return [weight / total for weight in weights]


def _cuts(proportions: List[float], count: int) -> List[int]:
    """n + 1 non-decreasing cut points from 0 to `count`, at the rounded cumulative
    proportions, so every one of `count` examples lands in exactly one part."""
    cuts = [0]
    cumulative = 0.0
    for proportion in proportions[:-1]:
        cumulative += proportion
        cuts.append(min(count, int(round(cumulative * count))))
    cuts.append(count)
    return cuts


def _format_labels(labels: FrozenSet[int]) -> str:
    """`0-3,7` for {0, 1, 2, 3, 7}: what `parse_labels` reads back."""
    runs: List[List[int]] = []
    for label in sorted(labels):
        if runs and label == runs[-1][1] + 1:
            runs[-1][1] = label
        else:
            runs.append([label, label])
    return ",".join(str(low) if low == high else f"{low}-{high}" for low, high in runs)
