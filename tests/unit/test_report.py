from __future__ import annotations

import json

import pytest

from coordinator.clients import Score
from coordinator.report import MetricsLog, label_groups, score_line, score_lines, score_record, share_line

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


def test_score_record_keeps_the_reference_keys_and_adds_the_metrics():
    metrics = {"loss": 0.5, "accuracy": 0.75, "recall/cat": 1.0, "recall/dog": 0.5}
    record = score_record(Score(3, 4, 0.5, (1, 3), metrics))
    assert record == {"accuracy": 0.75, "loss": 0.5, "correct": 3, "total": 4, "predicted_counts": [1, 3],
                      "metrics": metrics}
    assert json.loads(json.dumps(record)) == record


def test_score_record_of_an_old_evaluator_derives_loss_and_accuracy():
    record = score_record(Score(3, 4, 0.5, (1, 3)))
    assert record["metrics"] == {"loss": 0.5, "accuracy": 0.75}


REFERENCE_SCORE = Score(8693, 10000, 0.0032, (2000, 2000, 2000, 1999, 400, 400, 399, 300, 300, 302),
                        {"loss": 0.0032, "accuracy": 0.8693, **{f"recall/{d}": 0.87 for d in range(10)}})


def test_a_classification_prints_the_reference_lines_whatever_its_metrics():
    assert score_lines("Model update alice", REFERENCE_SCORE, label_groups(PARTITIONS)) == [
        "Model update alice: Percentage numbers 0-3: 79%, 4-6: 11%, 7-9: 9%",
        "Model update alice: Average loss: 0.0032, Accuracy: 8693/10000 (86.93%)",
    ]


@pytest.mark.parametrize("counts", [[], [[]], [[], []]])
def test_without_label_counts_the_share_line_is_left_out(counts):
    assert score_lines("Federated model", REFERENCE_SCORE, label_groups(counts)) == [
        "Federated model: Average loss: 0.0032, Accuracy: 8693/10000 (86.93%)",
    ]


def test_a_task_that_does_not_classify_prints_its_metrics_loss_first():
    score = Score(0, 0, 0.12344, (), {"mae": 3.2149, "loss": 0.12344, "iou": 0.5, "max_error": 1234567.0})
    assert score_lines("Federated model", score, label_groups([[]])) == [
        "Federated model: loss 0.1234, iou 0.5, mae 3.215, max_error 1.235e+06",
    ]
    assert score.accuracy == 0.0 and not score.classifies
    assert score_record(score)["metrics"] == score.metrics


def test_a_regression_from_an_old_evaluator_still_has_its_loss():
    assert score_lines("m", Score(0, 0, 0.25, ()), []) == ["m: loss 0.25"]


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
