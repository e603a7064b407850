"""Which examples of a split a board keeps, for experiments on one machine or a lab
fleet: `--labels` (classes), `--shard i/n` (an IID slice) and `--dirichlet ALPHA` (the
usual non-IID benchmark split, over the same n parts), seeded by `--partition-seed`.

Each worker computes its own part from the split's labels and the seed alone, so n
workers started with i = 1..n get disjoint parts whose union is the whole
(label-filtered) split, and a fleet simulated on one machine is reproducible. No
numpy: the Dirichlet draw uses the standard library's gamma variates, the same on
every Python a board runs."""

from __future__ import annotations

import argparse
import math
import random
from dataclasses import dataclass
from typing import FrozenSet, List, Optional, Tuple

import torch

from jetfed.data import parse_labels
from jetfed.errors import InvalidConfig


@dataclass(frozen=True)
class Partition:
    """labels: the classes kept (None: all); shard (i, n), i counted from 1: which of
    n parts; dirichlet: alpha of a per-class Dirichlet split over those parts (None:
    an IID split); seed: the partition's own seed."""

    labels: Optional[FrozenSet[int]] = None
    shard: Optional[Tuple[int, int]] = None
    dirichlet: Optional[float] = None
    seed: int = 0

    def is_everything(self) -> bool:
        return self.labels is None and self.shard is None

    def describe(self) -> str:
        parts = []
        if self.labels is not None:
            parts.append(f"labels {_ranges(sorted(self.labels))}")
        if self.shard is not None:
            index, count = self.shard
            split = f"Dirichlet({self.dirichlet:g})" if self.dirichlet is not None else "IID"
            parts.append(f"shard {index}/{count} ({split}, seed {self.seed})")
        return ", ".join(parts) or "all"

    def indices(self, targets: torch.Tensor, num_classes: int) -> torch.Tensor:
        """int64 indices into the split (ascending) of the examples this part keeps."""
        targets = targets.to(torch.int64).cpu()
        if self.labels is None:
            kept = torch.arange(len(targets))
        else:
            mask = torch.zeros(num_classes + 1, dtype=torch.bool)
            mask[sorted(self.labels)] = True
            kept = mask[targets.clamp(0, num_classes)].nonzero().flatten()
        if self.shard is None:
            return kept
        index, count = self.shard
        if count > len(kept):
            raise InvalidConfig(f"--shard {index}/{count}: {count} parts of {len(kept)} examples; use at most "
                                f"{len(kept)} parts")
        if self.dirichlet is None:
            part = _iid(kept, index, count, self.seed)
        else:
            part = _dirichlet(kept, targets[kept], index, count, self.dirichlet, self.seed)
        if not len(part):
            raise InvalidConfig(
                f"--shard {index}/{count} of Dirichlet({self.dirichlet:g}) with --partition-seed {self.seed} holds "
                "no examples; choose a larger --dirichlet or another --partition-seed")
        return part.sort().values


def _iid(kept: torch.Tensor, index: int, count: int, seed: int) -> torch.Tensor:
    """Part `index` of a seeded shuffle cut into `count` near-equal runs (sizes differ
    by at most one, like numpy.array_split)."""
    order = kept[torch.randperm(len(kept), generator=torch.Generator().manual_seed(seed))]
    size, extra = divmod(len(kept), count)
    start = (index - 1) * size + min(index - 1, extra)
    return order[start:start + size + (1 if index - 1 < extra else 0)]


def _dirichlet(kept: torch.Tensor, labels: torch.Tensor, index: int, count: int, alpha: float, seed: int) -> torch.Tensor:
    """Each class's examples, shuffled, dealt to the parts in proportions drawn from
    Dirichlet(alpha): small alpha, few classes per part; large alpha, close to IID."""
    taken: List[torch.Tensor] = []
    generator = torch.Generator().manual_seed(seed)
    for label in labels.unique().tolist():
        members = kept[labels == label]
        members = members[torch.randperm(len(members), generator=generator)]
        draw = random.Random(f"{seed}/{label}")
        gammas = [draw.gammavariate(alpha, 1.0) for _ in range(count)]
        total = sum(gammas) or 1.0
        cuts, running = [0], 0.0
        for gamma in gammas:
            running += gamma / total
            cuts.append(min(len(members), int(round(running * len(members)))))
        cuts[-1] = len(members)
        taken.append(members[cuts[index - 1]:cuts[index]])
    return torch.cat(taken) if taken else kept[:0]


def _ranges(values: List[int]) -> str:
    """[0, 1, 2, 3, 7] -> "0-3,7"."""
    runs: List[str] = []
    start = previous = None
    for value in values + [None]:  # type: ignore[operator]
        if value is not None and previous is not None and value == previous + 1:
            previous = value
            continue
        if start is not None:
            runs.append(str(start) if start == previous else f"{start}-{previous}")
        start = previous = value
    return ",".join(runs)


def parse_shard(spec: str) -> Tuple[int, int]:
    """`3/10` -> (3, 10): the third of ten parts, counted from 1."""
    index_text, sep, count_text = spec.partition("/")
    try:
        index, count = int(index_text), int(count_text)
    except ValueError:
        index = count = 0
    if not sep or count < 1:
        raise InvalidConfig(f"--shard {spec!r}: write i/n, e.g. --shard 3/10 for the third of ten parts")
    if not 1 <= index <= count:
        raise InvalidConfig(f"--shard {spec}: shards are numbered 1..{count}")
    return index, count


def partition_from_flags(
    labels: str, shard: Optional[str], dirichlet: Optional[float], seed: int, num_classes: int,
) -> Partition:
    """The partition the worker's flags describe, checked."""
    kept = None
    if labels.strip() != "all":
        if not num_classes:
            raise InvalidConfig("--labels: this task does not classify; use --shard to split its examples")
        kept = parse_labels(labels, num_classes)
    if dirichlet is not None:
        if shard is None:
            raise InvalidConfig(f"--dirichlet {dirichlet:g} splits over n parts: add --shard i/n to say which part "
                                "this worker takes")
        if not (math.isfinite(dirichlet) and dirichlet > 0):
            raise InvalidConfig(f"--dirichlet {dirichlet}: alpha must be a positive number (0.1: very skewed, "
                                "100: nearly IID)")
        if not num_classes:
            raise InvalidConfig("--dirichlet: this task does not classify; use --shard alone for an IID split")
    if not 0 <= seed < 2**63:
        raise InvalidConfig(f"--partition-seed {seed}: must be in 0..2**63-1")
    return Partition(labels=kept, shard=parse_shard(shard) if shard is not None else None,
                     dirichlet=dirichlet, seed=seed)


def add_partition_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--labels", default="all", help="classes this worker keeps: 0-3, 4,5,6 or all (default)")
    parser.add_argument("--shard", metavar="I/N", help="keep part I of N (counted from 1): an IID slice, or with "
                                                       "--dirichlet a non-IID one; every worker computes its own")
    parser.add_argument("--dirichlet", type=float, metavar="ALPHA",
                        help="split each class over the N parts of --shard in Dirichlet(ALPHA) proportions "
                             "(0.1: few classes per part; 100: nearly IID)")
    parser.add_argument("--partition-seed", type=int, default=0,
                        help="seed of --shard and --dirichlet (default 0): equal seeds, equal parts on every worker")
