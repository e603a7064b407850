"""`jetfed report RUN_DIR`: a run's metrics.jsonl drawn as PNGs a person reads at a glance.

Forty JSON lines hold everything a run measured but do not show whether the federation
learned, whether each worker's update stays stuck on the digits it holds while their
average spreads over all ten, or where the time went. accuracy.png, loss.png,
shares.png and rounds.png do, staleness.png for an asynchronous run, and recall.png (the federated model's recall of each
class) when the evaluator reported recall/<class> metrics. A task that does not
classify (its evaluations count no correct/total) gets metrics.png, each of its metrics
over the rounds, instead of accuracy.png and shares.png. Plots are drawn on an
operator's machine, never on a board, so matplotlib is the optional extra `report`
(requirements/report.txt), imported only to draw.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple

from jetfed.errors import JetfedError

log = logging.getLogger("coordinator.plots")

Round = Dict[str, Any]
Group = Tuple[str, Tuple[int, ...]]
GLOBAL = "global"
SIZE = (9.0, 5.0)
DPI = 120
# metrics.png draws at most this many of a task's metrics other than loss (loss.png has it), by name.
MAX_PANELS = 8


class ReportError(JetfedError):
    """Nothing can be drawn here; the message says what to do."""


def parse_groups(text: str) -> List[Group]:
    """`0-3,4-6,7-9` -> [("0-3", (0, 1, 2, 3)), ...]: digits 0-9, each in one group at most."""
    groups: List[Group] = []
    seen: Set[int] = set()
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


def classifies(rounds: Sequence[Round]) -> bool:
    """Whether the run's evaluations counted right answers; a run never evaluated is
    drawn as the classification it most likely is."""
    evaluated = [score for record in rounds for score in (record.get("evaluation") or {}).values()]
    return not evaluated or any(score.get("total") for score in evaluated)


def metric_names(rounds: Sequence[Round], name: str = GLOBAL) -> List[str]:
    """The metrics `name` was scored on, loss first, then by name (records older than
    named metrics have none)."""
    found = {metric for _, score in scores(rounds, name) for metric in score.get("metrics") or {}}
    return sorted(found, key=lambda metric: (metric != "loss", metric))


def recall_classes(rounds: Sequence[Round]) -> List[str]:
    """The classes with a recall/<class> metric for the federated model, in class order
    when the names are numbers (recall/10 after recall/9), else by name."""
    classes = [metric[len("recall/"):] for metric in metric_names(rounds) if metric.startswith("recall/")]
    return sorted(classes, key=lambda c: (not c.isdigit(), int(c) if c.isdigit() else 0, c))


def _label(name: str) -> str:
    return "federated model" if name == GLOBAL else f"{name}'s update"


def _figure(rows: int = 1, cols: int = 1, height: float = SIZE[1], **subplots: Any) -> Tuple[Any, Any]:
    """A figure outside pyplot (no global state, no window) with a grid of axes."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ReportError(
            "drawing needs matplotlib: pip install -r requirements/report.txt (in a checkout), "
            "or pip install '<checkout or jetfed wheel>[report]'"
        ) from None
    figure = Figure(figsize=(SIZE[0], height), dpi=DPI, layout="constrained")
    return figure, figure.subplots(rows, cols, squeeze=False, **subplots)


def _percent_axis(ax: Any) -> None:
    from matplotlib.ticker import PercentFormatter

    ax.set_ylim(0, 100)
    ax.yaxis.set_major_formatter(PercentFormatter(decimals=0))


def _round_axis(ax: Any, rounds: Sequence[Round]) -> None:
    """Every figure spans the whole run, so a round sits at the same place in each."""
    from matplotlib.ticker import MaxNLocator

    ax.set_xlim(rounds[0]["round"] - 0.7, rounds[-1]["round"] + 0.7)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")


def _evaluated_lines(ax: Any, rounds: Sequence[Round], names: Sequence[str], colours: Dict[str, str],
                     value: Callable[[Dict[str, Any]], float], final: str = "") -> None:
    """One line per evaluated model, the federated one emphasised; rounds whose evaluation
    failed are marked, and an axis with nothing to show says so."""
    drawn = False
    for name in names:
        points = scores(rounds, name)
        if points:
            drawn, main = True, name == GLOBAL
            last = final.format(points[-1][0], value(points[-1][1])) if final else ""
            ax.plot([n for n, _ in points], [value(s) for _, s in points], marker="o", color=colours[name],
                    linewidth=3 if main else 1.3, markersize=7 if main else 4.5, zorder=3 if main else 2,
                    label=(_label(name) if final or main else name) + last)
    for i, number in enumerate(r["round"] for r in rounds if "evaluation_error" in r):
        ax.axvline(number, color="tab:red", linestyle=":", linewidth=1.5, label=None if i else "evaluation failed")
    if not drawn:
        ax.text(0.5, 0.6, "no evaluated rounds", transform=ax.transAxes, ha="center", color="grey")


def plot_accuracy(ax: Any, rounds: Sequence[Round], names: Sequence[str], colours: Dict[str, str]) -> None:
    _evaluated_lines(ax, rounds, names, colours, lambda s: 100 * s["accuracy"], final=" (round {}: {:.1f}%)")
    _percent_axis(ax)
    _round_axis(ax, rounds)
    ax.set(title="Test accuracy of the federated model and of each worker's update", ylabel="accuracy")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower right")


def plot_recall(figure: Any, ax: Any, rounds: Sequence[Round], classes: Sequence[str]) -> None:
    """The federated model's recall of each class over the evaluated rounds: the class
    the federation keeps failing shows as the line that stays low."""
    from matplotlib import colormaps

    palette = colormaps["tab10" if len(classes) <= 10 else "tab20"]
    points = scores(rounds, GLOBAL)
    last: Dict[str, float] = {}
    for i, name in enumerate(classes):
        series = [(n, 100 * s["metrics"][f"recall/{name}"]) for n, s in points
                  if f"recall/{name}" in (s.get("metrics") or {})]
        if series:
            last[name] = series[-1][1]
            ax.plot(*zip(*series), marker="o", markersize=4, linewidth=1.5, color=palette(i % palette.N), label=name)
    _percent_axis(ax)
    _round_axis(ax, rounds)
    title = "Recall of each class by the federated model"
    if last:
        worst = min(last, key=last.__getitem__)
        title += f" (lowest at round {points[-1][0]}: class {worst}, {last[worst]:.1f}%)"
    ax.set(title=title, ylabel="recall")
    ax.grid(alpha=0.3)
    figure.legend(loc="outside right upper", fontsize="small", title="class", ncol=-(-len(classes) // 20))


def plot_metrics(figure: Any, axes: Any, rounds: Sequence[Round], names: Sequence[str], colours: Dict[str, str],
                 metrics: Sequence[str]) -> None:
    """One panel per metric of a task that does not classify: the federated model
    emphasised, each worker's update beside it."""
    for ax, metric in zip(axes.flat, metrics):
        for name in names:
            points = [(n, s["metrics"][metric]) for n, s in scores(rounds, name) if metric in (s.get("metrics") or {})]
            if points:
                main = name == GLOBAL
                ax.plot(*zip(*points), marker="o", color=colours[name], linewidth=3 if main else 1.3,
                        markersize=6 if main else 4, zorder=3 if main else 2, label=_label(name))
        ax.set(title=metric)
        ax.grid(alpha=0.3)
        _round_axis(ax, rounds)
    for ax in list(axes.flat)[len(metrics):]:
        ax.set_visible(False)
    legend: Dict[str, Any] = {}
    for ax in axes.flat:
        legend.update(zip(*reversed(ax.get_legend_handles_labels())))
    if legend:
        figure.legend(legend.values(), legend.keys(), loc="outside right upper", fontsize="small")


def plot_loss(figure: Any, axes: Any, rounds: Sequence[Round], names: Sequence[str], colours: Dict[str, str],
              measure: str = "mean NLL") -> None:
    """Test loss above, training loss below; one legend names a worker's colour in both."""
    from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

    evaluation, training = axes[0][0], axes[1][0]
    _evaluated_lines(evaluation, rounds, names, colours, lambda s: s["loss"])
    for name in names:
        trained = [(r["round"], r["updates"][name]["mean_loss"]) for r in rounds if name in (r.get("updates") or {})]
        if trained:
            training.plot(*zip(*trained), marker=".", color=colours[name], linewidth=1.3, label=name)
    evaluation.set(title=f"Test loss of the federated model and of each worker's update ({measure})", ylabel="test loss")
    training.set(title="Each worker's mean training loss on its own data", ylabel="training loss")
    legend: Dict[str, Any] = {}
    for ax in (evaluation, training):
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
        ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.grid(alpha=0.3, which="both")
        legend.update(zip(*reversed(ax.get_legend_handles_labels())))
    _round_axis(training, rounds)
    figure.legend(legend.values(), legend.keys(), loc="outside right upper", fontsize="small")


def plot_shares(figure: Any, axes: Any, rounds: Sequence[Round], names: Sequence[str], groups: Sequence[Group]) -> None:
    """Per model, stacked bars of the share of test predictions in each digit group."""
    from matplotlib import colormaps
    from matplotlib.patches import Patch

    covered = {label for _, labels in groups for label in labels}
    rest = tuple(d for d in range(10) if d not in covered)
    parts = [(f"digits {name}", labels) for name, labels in groups] + ([("other digits", rest)] if rest else [])
    colours = [colormaps["Set2"](i % 8) for i in range(len(groups))] + ["lightgrey"] * bool(rest)
    for ax, name in zip(axes.flat, names):
        points = scores(rounds, name)
        bottom = [0.0] * len(points)
        for (_, labels), colour in zip(parts, colours):
            shares = [100 * sum(s["predicted_counts"][d] for d in labels) / max(s["total"], 1) for _, s in points]
            bars = ax.bar(range(len(points)), shares, bottom=bottom, color=colour, edgecolor="white")
            ax.bar_label(bars, labels=[f"{v:.0f}" if v >= 9 else "" for v in shares], label_type="center", fontsize=8)
            bottom = [b + v for b, v in zip(bottom, shares)]
        ax.set_xticks(range(len(points)), [str(n) for n, _ in points])
        ax.set(title=_label(name), xlabel="round")
        _percent_axis(ax)
        if not points:
            ax.text(0.5, 0.6, "no evaluated rounds", transform=ax.transAxes, ha="center", color="grey")
    for ax in list(axes.flat)[len(names):]:
        ax.set_visible(False)
    axes[0][0].set_ylabel("share of test predictions")
    handles = [Patch(color=colour, label=label) for (label, _), colour in zip(parts, colours)]
    figure.legend(handles=handles, loc="outside lower center", ncol=len(parts))


def _names(record: Round, key: str) -> set:
    """Workers named under `key`; a late worker is named under "failed" and "late"."""
    return set(record.get(key) or ())


def plot_rounds(axes: Any, rounds: Sequence[Round]) -> None:
    """Where each round's time went, and which workers took part."""
    time_ax, worker_ax = axes[0][0], axes[1][0]
    numbers = [r["round"] for r in rounds]
    train = [r.get("train_s", 0.0) for r in rounds]
    evaluate = [r.get("eval_s", 0.0) for r in rounds]
    time_ax.bar(numbers, train, color="tab:blue", label="training (with retries)")
    time_ax.bar(numbers, evaluate, bottom=train, color="tab:orange", label="evaluation")
    top = max(t + e for t, e in zip(train, evaluate))
    total = sum(r.get("duration_s", 0.0) for r in rounds)
    time_ax.set(title=f"Duration of each round ({total:.1f} s in all)", ylabel="seconds", ylim=(0, top * 1.3 or 1))

    stacked = [0] * len(rounds)
    for label, colour, count in (
        ("contributed", "tab:green", lambda r: len(r.get("workers") or ())),
        ("failed", "tab:red", lambda r: len(_names(r, "failed") - _names(r, "late"))),
        ("late (missed the deadline)", "tab:orange", lambda r: len(_names(r, "failed") & _names(r, "late"))),
        ("skipped (backing off)", "tab:gray", lambda r: len(_names(r, "skipped"))),
    ):
        counts = [count(r) for r in rounds]
        if label == "contributed" or any(counts):
            worker_ax.bar(numbers, counts, bottom=stacked, color=colour, label=label)
            stacked = [s + c for s, c in zip(stacked, counts)]
    worker_ax.set(title="Workers per round", ylabel="workers", ylim=(0, max(stacked) * 1.35 + 0.5))
    worker_ax.yaxis.get_major_locator().set_params(integer=True)
    for ax in (time_ax, worker_ax):
        ax.grid(alpha=0.3, axis="y")
        ax.legend(loc="upper right", fontsize="small", ncol=4)
    _round_axis(worker_ax, rounds)


def asynchronous(rounds: Sequence[Round]) -> bool:
    """Whether the run made versions from buffered updates (fedbuff, fedasync)."""
    return any("version" in r for r in rounds)


def plot_staleness(ax: Any, rounds: Sequence[Round], colours: Dict[str, str]) -> None:
    """Each update's staleness (server steps taken while it trained) at the version it
    went into, by worker: a slow board's updates arrive staler."""
    seen = set()
    workers = sorted({k.split("#", 1)[0] for r in rounds for k in (r.get("updates") or {})})
    for record in rounds:
        for key, update in (record.get("updates") or {}).items():
            worker = key.split("#", 1)[0]
            offset = 0.25 * (workers.index(worker) - (len(workers) - 1) / 2) / max(len(workers), 1)
            ax.scatter(record["round"] + offset, update.get("staleness", 0), s=14, color=colours.get(worker, "gray"),
                       label=None if worker in seen else worker, alpha=0.7)
            seen.add(worker)
    ax.set(title="Staleness of each update (server steps while it trained)", ylabel="staleness", xlabel="version")
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize="small", ncol=4)


def private(rounds: Sequence[Round]) -> bool:
    """Whether the run trained with DP-SGD on its workers (metrics.jsonl "privacy")."""
    return any("privacy" in r for r in rounds)


def plot_privacy(axes: Any, rounds: Sequence[Round], colours: Dict[str, str]) -> None:
    """Each worker's cumulative epsilon by round (its own accountant), and the global
    model's accuracy against the largest of them: the accuracy-epsilon curve."""
    ax = axes[0][0]
    kept = [r for r in rounds if "privacy" in r]
    workers = sorted({w for r in kept for w in r["privacy"]["epsilon"]})
    for i, worker in enumerate(workers):
        points = [(r["round"], r["privacy"]["epsilon"][worker]) for r in kept if worker in r["privacy"]["epsilon"]]
        ax.plot(*zip(*points), label=worker, color=colours.get(worker, f"C{i % 10}"))
    delta = kept[-1]["privacy"]["delta"] if kept else 0.0
    ax.set(title=f"Each worker's epsilon (delta {delta:g})", xlabel="round", ylabel="epsilon")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize="small")
    ax = axes[0][1]
    curve = [(r["privacy"]["max_epsilon"], 100 * r["evaluation"][GLOBAL]["accuracy"]) for r in kept
             if "accuracy" in (r.get("evaluation") or {}).get(GLOBAL, {})]
    if curve:
        ax.plot(*zip(*curve), marker="o", color="black")
    ax.set(title="Global accuracy by the largest epsilon", xlabel="epsilon")
    _percent_axis(ax)
    ax.grid(alpha=0.3)


def _grid(count: int, most: int = 4) -> Tuple[int, int]:
    cols = min(count, most)
    return -(-count // cols), cols


def draw(rounds: Sequence[Round], groups: Sequence[Group], out: Path, title: str) -> List[Path]:
    """Write the PNGs into `out` (see the module's docstring for which); returns their paths."""
    names = model_names(rounds)
    colours = dict({name: f"C{i % 10}" for i, name in enumerate(names[1:])}, **{GLOBAL: "black"})
    figures = {}
    if classifies(rounds):
        figures["accuracy"], axes = _figure()
        plot_accuracy(axes[0][0], rounds, names, colours)
        figures["loss"], axes = _figure(2, 1, sharex=True)
        plot_loss(figures["loss"], axes, rounds, names, colours)
        evaluated = [n for n in names if scores(rounds, n)] or [GLOBAL]
        rows, cols = _grid(len(evaluated))
        figures["shares"], axes = _figure(rows, cols, SIZE[1] * (1 + 0.8 * (rows - 1)), sharey=True)
        plot_shares(figures["shares"], axes, rounds, evaluated, groups)
        classes = recall_classes(rounds)
        if classes:
            figures["recall"], axes = _figure()
            plot_recall(figures["recall"], axes[0][0], rounds, classes)
    else:
        metrics = [m for m in metric_names(rounds) if m != "loss"][:MAX_PANELS] or ["loss"]
        rows, cols = _grid(len(metrics), 2)
        figures["metrics"], axes = _figure(rows, cols, SIZE[1] * (1 + 0.6 * (rows - 1)))
        plot_metrics(figures["metrics"], axes, rounds, names, colours, metrics)
        figures["loss"], axes = _figure(2, 1, sharex=True)
        plot_loss(figures["loss"], axes, rounds, names, colours, measure="the task's loss")
    figures["rounds"], axes = _figure(2, 1, sharex=True)
    plot_rounds(axes, rounds)
    if private(rounds):
        figures["privacy"], axes = _figure(1, 2)
        plot_privacy(axes, rounds, colours)
    if asynchronous(rounds):
        workers = sorted({k.split("#", 1)[0] for r in rounds for k in (r.get("updates") or {})})
        figures["staleness"], axes = _figure()
        plot_staleness(axes[0][0], rounds, dict(colours, **{w: f"C{i % 10}" for i, w in enumerate(workers)}))
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, figure in figures.items():
        figure.suptitle(f"{title}: {name}", fontweight="bold")
        figure.savefig(out / f"{name}.png", dpi=DPI)
        written.append(out / f"{name}.png")
    return written


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="jetfed report", description="Draw a run's metrics.jsonl as "
                                     "accuracy.png, loss.png, shares.png and rounds.png, plus recall.png when "
                                     "the evaluations hold recall/<class> metrics; for a task that does not "
                                     "classify, metrics.png, loss.png and rounds.png.")
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a run's output folder, holding metrics.jsonl")
    parser.add_argument("--out", type=Path, metavar="DIR", help="where to write the PNGs (default: RUN_DIR)")
    parser.add_argument("--groups", type=parse_groups, default="0-3,4-6,7-9", metavar="A-B,C-D,...",
                        help="digit groups for shares.png, those the workers hold (default: %(default)s)")
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
