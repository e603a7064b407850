from __future__ import annotations

import argparse
import importlib.util
import json
import struct
import sys
from pathlib import Path
from typing import Any, Dict, List

import pytest

from coordinator.plots import load_rounds, main, parse_groups

draws = pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="needs the report extra (matplotlib)")

WORKERS = {"alice": (0, 1, 2, 3), "bob": (4, 5, 6), "charlie": (7, 8, 9)}
PNGS = ("accuracy.png", "loss.png", "shares.png", "rounds.png")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def score(predicted: List[int], accuracy: float) -> Dict[str, Any]:
    return {"accuracy": accuracy, "loss": 2.5 - 2 * accuracy, "correct": int(1000 * accuracy), "total": 1000,
            "predicted_counts": predicted}


def favouring(digits: tuple, share: float) -> List[int]:
    """1000 predictions, `share` of them spread over `digits`, the rest over the others."""
    others = [d for d in range(10) if d not in digits]
    return [int(1000 * share / len(digits)) if d in digits else int(1000 * (1 - share) / len(others))
            for d in range(10)]


def round_record(number: int) -> Dict[str, Any]:
    """Rounds 1, 6, 12 are evaluated and round 9's evaluation fails; bob fails round 6
    (so his update is not evaluated) and charlie misses round 8's deadline."""
    workers = [w for w in WORKERS if (number, w) not in {(6, "bob"), (8, "charlie")}]
    record: Dict[str, Any] = {
        "round": number, "lr": 0.1 * 0.98 ** (number - 1), "train_s": 0.4, "duration_s": 0.4,
        "workers": workers, "failed": {}, "late": [],
        "updates": {w: {"num_examples": 320, "mean_loss": 2.0 / number, "train_seconds": 0.3, "device": "cpu"}
                    for w in workers},
    }
    if number == 6:
        record["failed"] = {"bob": "UNAVAILABLE"}
    if number == 8:
        record["failed"], record["late"] = {"charlie": "DEADLINE_EXCEEDED"}, ["charlie"]
    if number in (1, 6, 12):
        progress = number / 12
        record["evaluation"] = {"global": score([100] * 10, 0.3 + 0.6 * progress)}
        record["evaluation"].update({w: score(favouring(WORKERS[w], 0.9), 0.2 + 0.4 * progress) for w in workers})
    if number == 9:
        record["evaluation_error"] = "UNAVAILABLE: evaluator down"
    if "evaluation" in record or "evaluation_error" in record:
        record["eval_s"] = 1.5
        record["duration_s"] += 1.5
    return record


def write_metrics(folder: Path, records: List[Dict[str, Any]], tail: str = "") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "metrics.jsonl"
    path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in records) + tail, encoding="utf-8")
    return path


def png_size(path: Path) -> tuple:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path.name} is not a PNG"
    return struct.unpack(">II", data[16:24])


@draws
def test_report_draws_four_pngs_of_the_expected_size(tmp_path, capsys):
    run = tmp_path / "run"
    write_metrics(run, [round_record(n) for n in range(1, 13)])

    assert main([str(run), "--out", str(tmp_path / "plots")]) == 0

    printed = capsys.readouterr().out.split()
    for name in PNGS:
        path = tmp_path / "plots" / name
        assert str(path) in printed
        assert png_size(path) == (1080, 600)
        assert path.stat().st_size > 20_000, f"{name} looks blank"
    assert not list(run.glob("*.png"))


@draws
def test_report_writes_into_the_run_by_default_and_survives_a_resumed_and_torn_file(tmp_path):
    records = [round_record(n) for n in range(1, 8)] + [round_record(n) for n in range(6, 13)]
    write_metrics(tmp_path, records, tail='{"round": 13, "lr": 0.0')

    assert main([str(tmp_path), "--groups", "0-3,4-6"]) == 0
    assert all(png_size(tmp_path / name) == (1080, 600) for name in PNGS)


@draws
def test_a_run_never_evaluated_still_draws(tmp_path):
    records = [round_record(n) for n in (2, 3, 9)]
    write_metrics(tmp_path, records)

    assert main([str(tmp_path)]) == 0
    assert all((tmp_path / name).stat().st_size > 10_000 for name in PNGS)


@pytest.mark.parametrize("content", [None, "", "\n"])
def test_no_rounds_exits_2(tmp_path, capsys, content):
    if content is not None:
        (tmp_path / "metrics.jsonl").write_text(content, encoding="utf-8")

    assert main([str(tmp_path)]) == 2
    assert "metrics.jsonl" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.png"))


def test_without_matplotlib_says_how_to_install_it(tmp_path, capsys, monkeypatch):
    write_metrics(tmp_path, [round_record(1)])
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)

    assert main([str(tmp_path)]) == 1
    assert "drawing needs matplotlib: pip install -r requirements/report.txt" in capsys.readouterr().err


def test_load_rounds_keeps_the_last_record_of_a_round_in_round_order(tmp_path):
    first, again = round_record(2), dict(round_record(2), lr=0.5)
    path = write_metrics(tmp_path, [round_record(3), first, again], tail="{torn")

    assert [(r["round"], r["lr"]) for r in load_rounds(path)] == [(2, 0.5), (3, round_record(3)["lr"])]


def test_parse_groups():
    assert parse_groups("0-3,4-6,7-9") == [("0-3", (0, 1, 2, 3)), ("4-6", (4, 5, 6)), ("7-9", (7, 8, 9))]
    assert parse_groups("1, 5") == [("1", (1,)), ("5", (5,))]


@pytest.mark.parametrize("text", ["0-3,3-5", "a-b", "5-2", "0-10", "", "0-3-5"])
def test_parse_groups_rejects(text):
    with pytest.raises(argparse.ArgumentTypeError):
        parse_groups(text)


def with_recall(record: Dict[str, Any]) -> Dict[str, Any]:
    """The record with the named metrics an evaluator of a classification task returns:
    class 9 is learned last."""
    for score_ in (record.get("evaluation") or {}).values():
        recall = {f"recall/{d}": min(1.0, score_["accuracy"] * (0.6 if d == 9 else 1.05)) for d in range(10)}
        score_["metrics"] = {"loss": score_["loss"], "accuracy": score_["accuracy"], **recall}
    return record


def regression(record: Dict[str, Any]) -> Dict[str, Any]:
    """The record as a task that does not classify leaves it: no counts, its own metrics."""
    for score_ in (record.get("evaluation") or {}).values():
        error = 10 * (1 - score_["accuracy"])
        score_.update(accuracy=0.0, correct=0, total=0, predicted_counts=[],
                      metrics={"loss": score_["loss"], "mae": error, "rmse": 1.3 * error, "r2": score_["accuracy"]})
    return record


@draws
def test_recall_metrics_add_a_recall_figure(tmp_path, capsys):
    write_metrics(tmp_path, [with_recall(round_record(n)) for n in range(1, 13)])

    assert main([str(tmp_path)]) == 0

    printed = capsys.readouterr().out.split()
    assert sorted(Path(p).name for p in printed) == sorted(PNGS + ("recall.png",))
    assert png_size(tmp_path / "recall.png")[1] == 600
    assert (tmp_path / "recall.png").stat().st_size > 20_000


@draws
def test_a_task_that_does_not_classify_gets_its_metrics_instead_of_accuracy(tmp_path, capsys):
    write_metrics(tmp_path, [regression(round_record(n)) for n in range(1, 13)])

    assert main([str(tmp_path)]) == 0

    printed = sorted(Path(p).name for p in capsys.readouterr().out.split())
    assert printed == ["loss.png", "metrics.png", "rounds.png"]
    assert not (tmp_path / "accuracy.png").exists() and not (tmp_path / "shares.png").exists()
    assert png_size(tmp_path / "metrics.png")[0] == 1080
    assert (tmp_path / "metrics.png").stat().st_size > 20_000
