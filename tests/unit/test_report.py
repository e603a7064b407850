from __future__ import annotations

import json

import pytest

from coordinator.clients import Score
from coordinator.report import MetricsLog, label_groups, score_line, score_record, share_line

PARTITIONS = [[5, 5, 5, 5, 0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 3, 3, 3, 0, 0, 0], [0] * 7 + [1, 1, 1]]


def test_label_groups_of_the_reference_partition():
    assert label_groups(PARTITIONS) == [
        ("0-3", (0, 1, 2, 3)),
        ("4-6", (4, 5, 6)),
        ("7-9", (7, 8, 9)),
    ]


@pytest.mark.parametrize(
    "counts, name",
    [
        ([0, 4, 0, 0, 0, 9, 0, 0, 0, 0], "1,5"),
        ([0, 0, 7, 0, 0, 0, 0, 0, 0, 0], "2"),
        ([1] * 10, "0-9"),
    ],
)
def test_label_group_names(counts, name):
    assert label_groups([counts])[0][0] == name


def test_share_line_matches_the_reference_layout():
    score = Score(8693, 10000, 0.0032, (2000, 2000, 2000, 1999, 400, 400, 399, 300, 300, 302))
    line = share_line("Model update alice", score, label_groups(PARTITIONS))
    assert line == "Model update alice: Percentage numbers 0-3: 79%, 4-6: 11%, 7-9: 9%"


def test_share_line_truncates_instead_of_rounding():
    score = Score(0, 3, 1.0, (2, 0, 0, 0, 1, 0, 0, 0, 0, 0))
    assert share_line("x", score, label_groups(PARTITIONS)) == "x: Percentage numbers 0-3: 66%, 4-6: 33%, 7-9: 0%"


def test_share_line_survives_an_empty_score():
    score = Score(0, 0, 0.0, (0,) * 10)
    assert share_line("x", score, label_groups(PARTITIONS)).endswith("0-3: 0%, 4-6: 0%, 7-9: 0%")


def test_score_line_matches_the_reference_layout():
    score = Score(8693, 10000, 0.0032, (0,) * 10)
    assert score_line("Federated model", score) == (
        "Federated model: Average loss: 0.0032, Accuracy: 8693/10000 (86.93%)"
    )


def test_score_line_formats_small_and_full_scores():
    assert score_line("m", Score(1, 3, 2.30258, (0,) * 10)) == "m: Average loss: 2.3026, Accuracy: 1/3 (33.33%)"
    assert score_line("m", Score(5, 5, 0.0, (0,) * 10)) == "m: Average loss: 0.0000, Accuracy: 5/5 (100.00%)"


def test_score_record():
    record = score_record(Score(3, 4, 0.5, (1, 3)))
    assert record == {"accuracy": 0.75, "loss": 0.5, "correct": 3, "total": 4, "predicted_counts": [1, 3]}


def test_metrics_log_writes_sorted_json_lines_and_flushes(tmp_path):
    path = tmp_path / "metrics.jsonl"
    log = MetricsLog(path)
    log.write({"round": 1, "accuracy": 0.5, "lr": 0.1})
    assert path.read_text(encoding="utf-8") == '{"accuracy": 0.5, "lr": 0.1, "round": 1}\n'
    log.write({"round": 2, "workers": {"bob": 1, "alice": 2}})
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 2
    assert lines[1] == '{"round": 2, "workers": {"alice": 2, "bob": 1}}'
    assert [json.loads(line)["round"] for line in lines] == [1, 2]
    log.close()


def test_metrics_log_appends_to_an_existing_file(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"round": 1}\n', encoding="utf-8")
    log = MetricsLog(path)
    log.write({"round": 2})
    log.close()
    assert path.read_text(encoding="utf-8").splitlines() == ['{"round": 1}', '{"round": 2}']
