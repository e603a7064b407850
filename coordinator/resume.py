"""Where a run starts: round 1 in an empty --out, or the round after the checkpoint with
--resume, once metrics.jsonl agrees with the checkpoint. The checkpoint is the truth:
a round is done when its state file is renamed into place, and metrics.jsonl must then
hold rounds 1..N once each. What a crash or a full disk can leave is repaired here, and
every repair is logged:

- a torn last line (the coordinator died mid-write) is dropped;
- lines of rounds after the checkpoint (written by an earlier version, which wrote the
  line first) are dropped: those rounds run again;
- the checkpoint's own round, missing when the coordinator stopped between the
  checkpoint and the line, is put back from the record the checkpoint carries.

Rounds recorded without any checkpoint (its folder removed) are refused, naming the fix:
resuming would run them again and record them twice."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from coordinator import checkpoint
from coordinator.federation import Federation, RunFailed, Say
from coordinator.fleet_model import OLDER_TASK
from coordinator.settings import RunSettings
from coordinator.strategies.registry import BASE, PRESETS, StrategySpec, resolve
from jetfed.errors import InvalidConfig
from jetfed.durable import write_atomically

log = logging.getLogger(__name__)

# What must not change between a run and its resumption, or the result is another run;
# the model too, by the name the fleet reported (run_identity), checked at connect.
# max_concurrency: whether a round streams its updates decides FedAvg's last bits.
_PINNED = ("task", "train", "lr_decay", "lr_min_factor", "weighting", "max_norm_ratio", "max_concurrency")
# Checkpoints from before strategies ran FedAvg.
_OLDER_STRATEGY = StrategySpec()

# (round, the line as written) for each whole record of metrics.jsonl.
Line = Tuple[int, str]


def run_identity(settings: RunSettings, model: str) -> Dict[str, Any]:
    """What a checkpoint pins; `model` is the fleet's model, which --model may leave out."""
    identity = {key: dataclasses.asdict(settings)[key] for key in _PINNED}
    identity["model"] = model
    identity["strategy"] = _strategy_identity(settings.strategy)
    return json.loads(json.dumps(identity))


def _strategy_identity(spec: StrategySpec) -> Dict[str, Any]:
    """The strategy by name and every parameter it resolves to: a default given
    explicitly is the same run, a changed parameter is another."""
    return {"name": spec.name, "params": spec.resolved()}


def _fill_added_params(strategy: Any) -> None:
    """Parameters added since a checkpoint was written (Nesterov momentum; scaffold's
    server optimizer) take the base value, which behaves as the code that wrote it did."""
    if isinstance(strategy, dict) and isinstance(strategy.get("params"), dict) and strategy.get("name") in PRESETS:
        params = strategy["params"]
        parts = {key: params[key] for key in ("aggregator", "server_optimizer") if key in params}
        try:
            keys = resolve(strategy["name"], parts)
        except InvalidConfig:
            return  # then the comparison names the difference
        for key in keys:
            params.setdefault(key, BASE[key])


def first_round(settings: RunSettings, federation: Federation, say: Say) -> int:
    """1, or the round after the checkpoint when resuming (its model and run id
    restored: to the workers it is the same run, never refused as a second one)."""
    folder = settings.out_dir / "checkpoint"
    metrics = settings.out_dir / "metrics.jsonl"
    saved = checkpoint.load(folder)
    if not settings.resume:
        if saved is not None or (metrics.exists() and metrics.stat().st_size):
            raise RunFailed(f"out: {settings.out_dir} already holds a run; pass --resume to continue it or choose "
                            "another --out")
        return 1
    text = metrics.read_text(encoding="utf-8", errors="replace") if metrics.exists() else ""
    lines = _whole_lines(metrics, text)
    if saved is None:
        if lines:
            raise RunFailed(
                f"resume: {metrics} holds rounds {lines[0][0]}-{lines[-1][0]} but {folder} holds no checkpoint, so "
                f"they would run again and be recorded twice. Put the checkpoint folder back, or move {metrics.name} "
                f"aside to start over at round 1")
        _rewrite(metrics, text, [])
        log.info("resume: no checkpoint in %s; starting at round 1", folder)
        return 1
    # Checkpoints from before tasks pinned no task: they ran mnist.
    pinned = {"task": OLDER_TASK, "strategy": _strategy_identity(_OLDER_STRATEGY), "max_concurrency": 0, **saved.run}
    if isinstance(pinned.get("train"), dict):  # recipes from before FedProx sent no proximal term
        pinned["train"] = {"proximal_mu": 0.0, **pinned["train"]}
    _fill_added_params(pinned.get("strategy"))
    model = pinned.get("model")
    if not isinstance(model, str):
        raise RunFailed(f"resume: {folder} was written by a run with other settings: {saved.run}")
    now = run_identity(settings, model)
    if pinned != now:
        differ = "; ".join(f"{key}: {pinned.get(key)!r} then, {now.get(key)!r} now"
                           for key in sorted(set(pinned) | set(now)) if pinned.get(key) != now.get(key))
        raise RunFailed(f"resume: {folder} was written by a run with other settings ({differ}); resume with the "
                        "run's own settings, or choose another --out")
    if settings.model is not None and settings.model != model:
        raise RunFailed(f"resume: --model {settings.model}, but the run in {folder} trains {model}; resume it "
                        f"without --model, or with --model {model}")
    federation.restore(saved.state, model, saved.round)
    if saved.strategy is not None:
        federation.strategy.load_state_dict(*saved.strategy)
    if saved.run_id is not None:
        federation.run_id = saved.run_id
    else:
        log.warning("resume: the checkpoint in %s holds no run id (written before run ids were kept); this run is "
                    "now run=%s", folder, federation.run_id)
    _rewrite(metrics, text, _agree(lines, saved.round, saved.record))
    say(f"Resuming after round {saved.round}/{settings.rounds}")
    return saved.round + 1


def _whole_lines(path: Path, text: str) -> List[Line]:
    """The records of metrics.jsonl. Unreadable lines at the end are a torn write and
    dropped; one followed by good lines is damage no crash makes, and is refused."""
    lines = text.split("\n")
    torn = lines.pop()  # "" after a whole last line
    records: List[Optional[Line]] = [_parse(line) for line in lines]
    whole = len(records)
    while whole and records[whole - 1] is None:
        whole -= 1
    if None in records[:whole]:
        number = records.index(None) + 1
        raise RunFailed(f"resume: {path} line {number} is not a round's record; repair or remove that line")
    if torn or whole < len(records):
        dropped = "\n".join(lines[whole:] + [torn])
        log.warning("resume: dropped the torn end of %s (%d bytes; the coordinator stopped mid-write, e.g. on a full "
                    "disk): %.80r", path, len(dropped.encode()), dropped)
    return [line for line in records[:whole] if line is not None]


def _parse(line: str) -> Optional[Line]:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    number = record.get("round") if isinstance(record, dict) else None
    return (number, line) if isinstance(number, int) and not isinstance(number, bool) else None


def _agree(lines: List[Line], last: int, record: Optional[Dict[str, Any]]) -> List[Line]:
    """Rounds 1..`last` once each: later rounds dropped, the checkpoint's round put back."""
    later = [number for number, _ in lines if number > last]
    if later:
        log.warning("resume: dropped the metrics of rounds %s, after the checkpoint's round %d: they run again",
                    ", ".join(map(str, later)), last)
    kept = dict(line for line in lines if line[0] <= last)  # a round recorded twice keeps its last record
    if len(kept) < len(lines) - len(later):
        log.warning("resume: rounds recorded more than once now appear once, with their last record")
    if last not in kept and record is not None:
        kept[last] = json.dumps(record, sort_keys=True)
        log.warning("resume: round %d's metrics restored from its checkpoint (the coordinator stopped between "
                    "the checkpoint and the metrics line)", last)
    missing = sorted(set(range(1, last + 1)) - set(kept))
    if missing:
        log.warning("resume: metrics.jsonl has no record of rounds %s (removed or lost); they are not run again",
                    ", ".join(map(str, missing)))
    return sorted(kept.items())


def _rewrite(path: Path, text: str, lines: List[Line]) -> None:
    """Replace metrics.jsonl atomically with `lines`, only when they differ from it."""
    wanted = "".join(line + "\n" for _, line in lines)
    if wanted != text:
        write_atomically(path, wanted.encode("utf-8"))
