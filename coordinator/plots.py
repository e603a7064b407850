"""`jetfed report RUN_DIR`: a run's metrics.jsonl drawn as PNGs a person reads at a glance.

Forty JSON lines hold everything a run measured but do not show whether the federation
learned, whether each worker's update stays stuck on the digits it holds while their
average spreads over all ten, or where the time went. accuracy.png, loss.png,
shares.png and rounds.png do. Plots are drawn on an operator's machine, never on a
board, so matplotlib is the optional extra `jetfed[report]`, imported only to draw.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from jetfed.errors import JetfedError

log = logging.getLogger("coordinator.plots")

Round = Dict[str, Any]
Group = Tuple[str, Tuple[int, ...]]
GLOBAL = "global"
SIZE = (9.0, 5.0)
DPI = 120


class ReportError(JetfedError):
    """Nothing can be drawn here; the message says what to do."""


def parse_groups(text: str) -> List[Group]:
    """`0-3,4-6,7-9` -> [("0-3", (0, 1, 2, 3)), ...]: digits 0-9, each in one group at most."""
    groups: List[Group] = []
    seen = set()
    for part in (p.strip() for p in text.split(",")):
        first, _, last = part.partition("-")
        try:
            labels = tuple(range(int(first), int(last or first) + 1))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{part!r} is neither a digit nor a range like 0-3") from None
        if not labels or labels[0] < 0 or labels[-1] > 9 or seen.intersection(labels):
            raise argparse.ArgumentTypeError(f"{part!r}: groups are ranges of the digits 0-9 that do not overlap")
        seen.update(labels)
        groups.append((part, labels))
    return groups


def load_rounds(path: Path) -> List[Round]:
    """One record per round, in order. A resumed run may repeat a round (the later record
    wins); a crash may leave a torn last line (skipped with a warning)."""
    by_number: Dict[int, Round] = {}
    with path.open(encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                by_number[int(record["round"])] = record
            except (ValueError, KeyError, TypeError):
                log.warning("skipping line %d of %s: not a round record", line_number, path)
    return [by_number[number] for number in sorted(by_number)]


def model_names(rounds: Sequence[Round]) -> List[str]:
    """"global" first, then every worker in the order the run first names it."""
    names: Dict[str, None] = {}
    for record in rounds:
        for key in ("workers", "failed", "late", "skipped", "updates", "evaluation"):
            for name in record.get(key) or ():
                names.setdefault(name, None)
    names.pop(GLOBAL, None)
    return [GLOBAL] + list(names)


def scores(rounds: Sequence[Round], name: str) -> List[Tuple[int, Dict[str, Any]]]:
    """(round, score) for every round in which `name` was evaluated."""
    return [(r["round"], r["evaluation"][name]) for r in rounds if name in (r.get("evaluation") or {})]


def _label(name: str) -> str:
    return "federated model" if name == GLOBAL else f"{name}'s update"


def _figure(rows: int, cols: int, height: float = SIZE[1], **subplots: Any) -> Tuple[Any, Any]:
    """A figure outside pyplot (no global state, no window) with a grid of axes."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ReportError("drawing needs matplotlib: pip install 'jetfed[report]'") from None
    figure = Figure(figsize=(SIZE[0], height), dpi=DPI, layout="constrained")
    return figure, figure.subplots(rows, cols, squeeze=False, **subplots)


def _percent_axis(ax: Any) -> None:
    from matplotlib.ticker import PercentFormatter

    ax.set_ylim(0, 100)
    ax.yaxis.set_major_formatter(PercentFormatter(decimals=0))


def _integer_rounds(ax: Any) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")


def _mark_evaluation_errors(ax: Any, rounds: Sequence[Round]) -> None:
    failed = [r["round"] for r in rounds if "evaluation_error" in r]
    for i, number in enumerate(failed):
        ax.axvline(number, color="tab:red", linestyle=":", linewidth=1.5,
                   label="evaluation failed" if i == 0 else None)


def plot_accuracy(rounds: Sequence[Round], names: Sequence[str], colours: Dict[str, str], ax: Any) -> None:
    for name in names:
        points = scores(rounds, name)
        if points:
            main = name == GLOBAL
            last = f" (round {points[-1][0]}: {100 * points[-1][1]['accuracy']:.1f}%)"
            ax.plot([n for n, _ in points], [100 * s["accuracy"] for _, s in points], marker="o",
                    color=colours[name], linewidth=3 if main else 1.3, markersize=7 if main else 4.5,
                    zorder=3 if main else 2, label=_label(name) + last)
    _mark_evaluation_errors(ax, rounds)
    _percent_axis(ax)
    _integer_rounds(ax)
    ax.set(title="Test accuracy of the federated model and of each worker's update", ylabel="accuracy")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")


def plot_loss(rounds: Sequence[Round], names: Sequence[str], colours: Dict[str, str], figure: Any, axes: Any) -> None:
    """Test loss above, training loss below; one legend names a worker's colour in both."""
    from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

    evaluation, training = axes[0][0], axes[1][0]
    for name in names:
        points = scores(rounds, name)
        if points:
            main = name == GLOBAL
            evaluation.plot([n for n, _ in points], [s["loss"] for _, s in points], marker="o",
                            color=colours[name], linewidth=3 if main else 1.3, markersize=7 if main else 4.5,
                            zorder=3 if main else 2, label=_label(name) if main else name)
        trained = [(r["round"], r["updates"][name]["mean_loss"]) for r in rounds if name in (r.get("updates") or {})]
        if trained:
            training.plot([n for n, _ in trained], [loss for _, loss in trained], marker=".",
                          color=colours[name], linewidth=1.3, label=name)
    _mark_evaluation_errors(evaluation, rounds)
    evaluation.set(title="Test loss of the federated model and of each worker's update (mean NLL)", ylabel="test loss")
    training.set(title="Each worker's mean training loss on its own data", ylabel="training loss")
    legend: Dict[str, Any] = {}
    for ax in (evaluation, training):
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
        ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.grid(alpha=0.3, which="both")
        legend.update(zip(*reversed(ax.get_legend_handles_labels())))
    _integer_rounds(training)
    figure.legend(legend.values(), legend.keys(), loc="outside right upper", fontsize="small")


def plot_shares(rounds: Sequence[Round], names: Sequence[str], groups: Sequence[Group], figure: Any, axes: Any) -> None:
    from matplotlib import colormaps

    covered = {label for _, labels in groups for label in labels}
    parts = list(groups) + ([("other", tuple(d for d in range(10) if d not in covered))] if len(covered) < 10 else [])
    palette = colormaps["Set2"]
    colours = ["lightgrey" if name == "other" else palette(i % 8) for i, (name, _) in enumerate(parts)]
    for ax, name in zip(axes.flat, names):
        points = scores(rounds, name)
        positions = range(len(points))
        bottom = [0.0] * len(points)
        for (group, labels), colour in zip(parts, colours):
            shares = [100 * sum(s["predicted_counts"][d] for d in labels) / max(s["total"], 1) for _, s in points]
            bars = ax.bar(positions, shares, bottom=bottom, color=colour, edgecolor="white", width=0.8, label=group)
            ax.bar_label(bars, labels=[f"{v:.0f}" if v >= 9 else "" for v in shares], label_type="center", fontsize=8)
            bottom = [b + v for b, v in zip(bottom, shares)]
        ax.set_xticks(list(positions), [str(n) for n, _ in points])
        ax.set(title=_label(name), xlabel="round")
        _percent_axis(ax)
    for ax in list(axes.flat)[len(names):]:
        ax.set_visible(False)
    axes[0][0].set_ylabel("share of test predictions")
    handles, labels = axes[0][0].get_legend_handles_labels()
    figure.legend(handles, [f"digits {label}" for label in labels], loc="outside lower center", ncol=len(parts))


def plot_rounds(rounds: Sequence[Round], axes: Any) -> None:
    time_ax, worker_ax = axes[0][0], axes[1][0]
    numbers = [r["round"] for r in rounds]
    train = [r.get("train_s", 0.0) for r in rounds]
    evaluate = [r.get("eval_s", 0.0) for r in rounds]
    other = [max(r.get("duration_s", 0.0) - t - e, 0.0) for r, t, e in zip(rounds, train, evaluate)]
    time_ax.bar(numbers, train, color="tab:blue", label="training")
    time_ax.bar(numbers, evaluate, bottom=train, color="tab:orange", label="evaluation")
    if max(other) > 0.01:
        time_ax.bar(numbers, other, bottom=[t + e for t, e in zip(train, evaluate)], color="tab:gray", label="other")
    time_ax.set(title="Duration of each round", ylabel="seconds", ylim=(0, max(map(sum, zip(train, evaluate, other))) * 1.3))

    bottom = [0] * len(rounds)
    for key, colour, label in (("workers", "tab:green", "contributed"), ("failed", "tab:red", "failed"),
                               ("late", "tab:orange", "late (deadline)"), ("skipped", "tab:gray", "skipped (backing off)")):
        counts = [_count(r, key) for r in rounds]
        if key == "workers" or any(counts):
            worker_ax.bar(numbers, counts, bottom=bottom, color=colour, label=label)
            bottom = [b + c for b, c in zip(bottom, counts)]
    worker_ax.set(title="Workers per round", ylabel="workers", ylim=(0, max(bottom) * 1.35 + 0.5))
    worker_ax.yaxis.get_major_locator().set_params(integer=True)
    for ax in (time_ax, worker_ax):
        ax.grid(alpha=0.3, axis="y")
        ax.legend(loc="upper right", fontsize="small", ncol=4)
    _integer_rounds(worker_ax)


def _count(record: Round, key: str) -> int:
    """Workers per outcome; a late worker is also in "failed", so it is counted once, as late."""
    late = set(record.get("late") or ()) & set(record.get("failed") or ())
    if key == "failed":
        return len(set(record.get("failed") or ()) - late)
    if key == "late":
        return len(late)
    return len(record.get(key) or ())


def draw(rounds: Sequence[Round], groups: Sequence[Group], out: Path, title: str) -> List[Path]:
    """Write the four PNGs into `out`; returns their paths."""
    names = model_names(rounds)
    colours = dict({name: f"C{i % 10}" for i, name in enumerate(names[1:])}, **{GLOBAL: "black"})
    evaluated = [n for n in names if scores(rounds, n)] or [GLOBAL]
    cols = min(len(evaluated), 4)
    rows = -(-len(evaluated) // cols)
    plans: List[Tuple[str, Tuple[int, int, float], Dict[str, Any], Callable[[Any, Any], None]]] = [
        ("accuracy.png", (1, 1, SIZE[1]), {}, lambda f, a: plot_accuracy(rounds, names, colours, a[0][0])),
        ("loss.png", (2, 1, SIZE[1]), {"sharex": True}, lambda f, a: plot_loss(rounds, names, colours, f, a)),
        ("shares.png", (rows, cols, SIZE[1] * (1 + 0.8 * (rows - 1))), {"sharey": True},
         lambda f, a: plot_shares(rounds, evaluated, groups, f, a)),
        ("rounds.png", (2, 1, SIZE[1]), {"sharex": True}, lambda f, a: plot_rounds(rounds, a)),
    ]
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for filename, (r, c, height), options, plot in plans:
        figure, axes = _figure(r, c, height, **options)
        plot(figure, axes)
        figure.suptitle(f"{title}: {filename[:-4]}", fontweight="bold")
        figure.savefig(out / filename, dpi=DPI)
        written.append(out / filename)
    return written


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="jetfed report", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a run's output folder, holding metrics.jsonl")
    parser.add_argument("--out", type=Path, help="where to write the PNGs (default: RUN_DIR)")
    parser.add_argument("--groups", type=parse_groups, default=parse_groups("0-3,4-6,7-9"), metavar="0-3,4-6,7-9",
                        help="digit groups for shares.png, the digits each worker holds (default: 0-3,4-6,7-9)")
    args = parser.parse_args(argv)
    metrics = args.run_dir / "metrics.jsonl"
    rounds = load_rounds(metrics) if metrics.is_file() else []
    if not rounds:
        why = "holds no rounds yet" if metrics.is_file() else "does not exist: RUN_DIR is a coordinator's --out folder"
        print(f"jetfed report: error: {metrics} {why}", file=sys.stderr)
        return 2
    try:
        written = draw(rounds, args.groups, args.out or args.run_dir, args.run_dir.resolve().name)
    except ReportError as exc:
        print(f"jetfed report: error: {exc}", file=sys.stderr)
        return 1
    for path in written:
        print(path)
    return 0
