"""What a run tells its user: the reference's console layout, and metrics.jsonl (one
JSON object per round, appended and synced as each round ends, after its checkpoint)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Sequence, Tuple

from jetfed.durable import sync_directory
from coordinator.clients import Score

LabelGroup = Tuple[str, Tuple[int, ...]]


def label_groups(label_counts: Sequence[Sequence[int]]) -> List[LabelGroup]:
    """One group per worker, named like `0-3` or `1,5`: the digits that worker holds."""
    groups = []
    for counts in label_counts:
        labels = tuple(label for label, count in enumerate(counts) if count)
        if labels and labels == tuple(range(labels[0], labels[-1] + 1)) and len(labels) > 1:
            name = f"{labels[0]}-{labels[-1]}"
        else:
            name = ",".join(str(label) for label in labels)
        groups.append((name, labels))
    return groups


def share_line(who: str, score: Score, groups: Sequence[LabelGroup]) -> str:
    """Truncated percentages, as the reference printed them."""
    total = max(score.total, 1)
    shares = ", ".join(
        f"{name}: {int(100 * sum(score.predicted_counts[label] for label in labels) / total)}%"
        for name, labels in groups
    )
    return f"{who}: Percentage numbers {shares}"


def score_line(who: str, score: Score) -> str:
    return (
        f"{who}: Average loss: {score.loss:.4f}, Accuracy: {score.correct}/{score.total} "
        f"({100.0 * score.accuracy:.2f}%)"
    )


def metric_names(metrics: Mapping[str, float]) -> List[str]:
    """loss first, then the others by name: a map off the wire has no order of its own."""
    return sorted(metrics, key=lambda name: (name != "loss", name))


def describe_metrics(metrics: Mapping[str, float]) -> str:
    """`loss 0.1234, mae 3.21`"""
    return ", ".join(f"{name} {metrics[name]:.4g}" for name in metric_names(metrics))


def metrics_line(who: str, score: Score) -> str:
    """`Federated model: loss 0.1234, mae 3.21`: a task that does not classify."""
    return f"{who}: {describe_metrics(score.metrics)}"


def score_lines(who: str, score: Score, groups: Sequence[LabelGroup]) -> List[str]:
    """What the console says of one model: for classification the reference's two lines
    (the share line only when the workers announced label counts); otherwise one line
    of the task's metrics."""
    if not score.classifies:
        return [metrics_line(who, score)]
    has_counts = any(labels for _, labels in groups) and bool(score.predicted_counts)
    return ([share_line(who, score, groups)] if has_counts else []) + [score_line(who, score)]


def score_record(score: Score) -> Dict[str, Any]:
    """A model's entry under "evaluation" in metrics.jsonl: the reference's keys, which
    readers of older runs rely on, and the task's named metrics."""
    return {
        "accuracy": score.accuracy,
        "loss": score.loss,
        "correct": score.correct,
        "total": score.total,
        "predicted_counts": list(score.predicted_counts),
        "metrics": dict(score.metrics),
    }


class MetricsLog:
    """metrics.jsonl, one line per round, each written whole by one append and synced
    before the next round starts: a crash or a full disk can tear only the last line,
    which --resume drops (see coordinator.resume)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        created = not path.exists()
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        if created:
            sync_directory(path.parent)

    def write(self, record: Dict[str, Any]) -> None:
        line = memoryview((json.dumps(record, sort_keys=True) + "\n").encode())
        while line:
            line = line[os.write(self._fd, line):]
        os.fsync(self._fd)

    def close(self) -> None:
        os.close(self._fd)
