"""jetfed_evaluation_metric: the task's metrics of each scored model as a gauge, with
label values bounded whatever names a task chooses."""

from __future__ import annotations

import logging

from jetfed.telemetry import MAX_METRIC_NAME, MAX_METRICS_PER_MODEL, RunTelemetry, bounded_metrics, metric_label


def gauge(telemetry: RunTelemetry, model: str, metric: str):
    return telemetry.registry.get_sample_value("jetfed_evaluation_metric", {"model": model, "metric": metric})


def series(telemetry: RunTelemetry) -> set:
    return {(s.labels["model"], s.labels["metric"]) for family in telemetry.registry.collect()
            for s in family.samples if s.name == "jetfed_evaluation_metric"}


def test_each_scored_models_metrics_become_a_gauge():
    telemetry = RunTelemetry()
    telemetry.set_evaluation(3, {
        "global": {"loss": 0.12, "accuracy": 0.97, "recall/0": 0.99, "recall/1": 0.95},
        "alice": {"loss": 1.5, "accuracy": 0.4},
    })
    assert gauge(telemetry, "global", "accuracy") == 0.97
    assert gauge(telemetry, "global", "recall/1") == 0.95
    assert gauge(telemetry, "alice", "loss") == 1.5
    assert telemetry.registry.get_sample_value("jetfed_evaluated_round") == 3


def test_a_new_evaluation_replaces_the_last_so_no_stale_update_remains():
    telemetry = RunTelemetry()
    telemetry.set_evaluation(1, {"global": {"loss": 0.5, "mae": 3.0}, "bob": {"loss": 0.9, "mae": 4.0}})
    telemetry.set_evaluation(2, {"global": {"loss": 0.4, "mae": 2.5}})
    assert series(telemetry) == {("global", "loss"), ("global", "mae")}
    assert gauge(telemetry, "global", "mae") == 2.5


def test_metric_names_are_sanitised_and_cut():
    assert metric_label("recall/cat") == "recall/cat"
    assert metric_label('top-5 acc{x="1"}\n') == "top-5_acc_x__1___"
    assert metric_label("") == "_"
    assert len(metric_label("m" * 500)) == MAX_METRIC_NAME


def test_at_most_64_metrics_a_model_loss_and_accuracy_kept_first(caplog):
    values = {f"recall/{c:04d}": c / 1000 for c in range(1000)}
    values.update(loss=0.3, accuracy=0.8)
    kept = bounded_metrics(values)
    assert len(kept) == MAX_METRICS_PER_MODEL == 64
    assert list(kept)[:3] == ["loss", "accuracy", "recall/0000"]
    assert list(kept)[-1] == "recall/0061"

    telemetry = RunTelemetry()
    with caplog.at_level(logging.WARNING, logger="jetfed.telemetry"):
        telemetry.set_evaluation(1, {"global": values, "alice": values})
        telemetry.set_evaluation(2, {"global": values})
    assert len(series(telemetry)) == 64
    assert gauge(telemetry, "global", "accuracy") == 0.8
    assert [r.getMessage() for r in caplog.records] == [
        "jetfed_evaluation_metric keeps 64 of the 1002 metrics of model global (at most 64 a model)"]
