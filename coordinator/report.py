"""What a run tells its user: the reference's console layout, and metrics.jsonl (one
JSON object per round, appended and flushed as each round ends, so a crash loses none)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import IO, Any, Dict, List, Sequence, Tuple

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


def score_record(score: Score) -> Dict[str, Any]:
    return {
        "accuracy": score.accuracy,
        "loss": score.loss,
        "correct": score.correct,
        "total": score.total,
        "predicted_counts": list(score.predicted_counts),
    }


class MetricsLog:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._handle: IO[str] = path.open("a", encoding="utf-8")

    def write(self, record: Dict[str, Any]) -> None:
        self._handle.write(json.dumps(record, sort_keys=True) + "\n")
        self._handle.flush()

    def close(self) -> None:
        self._handle.close()
