"""`jetfed coordinator`: run a federation over the workers and evaluator given by a
config file (--config federation.toml) and flags. It needs no task code: the fleet must
run --task (checked at connect), and round 1 starts from --init-weights or a worker's
freshly built model."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import torch

from coordinator.config_file import load_config
from coordinator.federation import RunSummary
from coordinator.runner import run
from coordinator.settings import DEFAULT_MAX_NORM_RATIO, DEFAULT_TASK, WEIGHTINGS, RunSettings
from coordinator.strategies.registry import DEFAULT_STRATEGY, PRESETS, StrategySpec, parse_param_flag
from jetfed import allocator, logs, stream, tls
from jetfed.signals import cancel_on_signals
from jetfed.auth import add_token_argument, read_token
from jetfed.config import OPTIMIZERS, TrainConfig
from jetfed.errors import InvalidConfig, JetfedError

log = logging.getLogger("coordinator")


def parse_endpoint(value: str) -> tuple:
    name, sep, address = value.partition("=")
    if not sep or not name or ":" not in address:
        raise argparse.ArgumentTypeError(f"{value!r} is not NAME=HOST:PORT")
    return name, address


def parse_min_workers(value: str) -> Union[int, str]:
    if value == "all":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is neither a number nor 'all'") from None


DEFAULTS: Dict[str, Any] = {
    "worker": [], "workers_dns": None, "evaluator": None, "rounds": 40, "eval_every": 10, "task": DEFAULT_TASK, "model": None,
    "init_weights": None,
    "optimizer": TrainConfig.optimizer, "lr": TrainConfig.lr, "lr_decay": 0.98, "lr_min_factor": 0.01,
    "momentum": TrainConfig.momentum, "batch_size": TrainConfig.batch_size, "batches": TrainConfig.max_batches,
    "epochs": TrainConfig.epochs, "dp_noise_multiplier": 0.0, "dp_max_grad_norm": 0.0, "dp_delta": 0.0,
    "dp_epsilon_budget": 0.0, "seed": 1, "weighting": "examples", "max_norm_ratio": DEFAULT_MAX_NORM_RATIO,
    "strategy": DEFAULT_STRATEGY, "strategy_params": {},
    "out": None,
    "chunk_bytes": stream.DEFAULT_CHUNK_BYTES, "max_payload_bytes": None,
    "round_timeout": 300.0, "eval_timeout": 300.0, "connect_timeout": 60.0, "min_workers": None,
    "round_retries": 3, "max_backoff": 30.0, "max_concurrency": 0, "resume": False, "log_level": "INFO", "status_address": None,
    "metrics_address": None, "secure_aggregation": False, "secagg_threshold": 0, "secagg_clip": 1.0,
    "secagg_max_workers": 0, "uplink_encoding": "raw", "downlink_encoding": "raw",
}


def build_parser() -> argparse.ArgumentParser:
    """Every flag defaults to 'not given', so a config file's value survives unless the
    flag overrides it; the effective defaults live in DEFAULTS and show in --help."""
    p = argparse.ArgumentParser(prog="jetfed coordinator", description=__doc__, argument_default=argparse.SUPPRESS)

    def flag(name: str, help: str = "", **kwargs: Any) -> None:  # argparse.add_argument's keywords
        key = name[2:].replace("-", "_")
        shown = f" (default: {DEFAULTS[key]})" if DEFAULTS.get(key) not in (None, [], False) else ""
        p.add_argument(name, help=help + shown, **kwargs)

    p.add_argument("--config", type=Path, help="a federation.toml; flags override its keys")
    flag("--worker", "a worker to train on (repeat for each)", action="append", type=parse_endpoint,
         metavar="NAME=HOST:PORT")
    flag("--workers-dns", "every address this name resolves to is a worker on PORT, named by its GetInfo, e.g. "
         "a headless Service jetfed-workers.jetfed.svc.cluster.local:8777; looked up again between rounds, so a "
         "board that appears joins the run (beside any --worker)", metavar="HOST:PORT")
    flag("--evaluator", "the evaluator scoring models on the test set", metavar="[NAME=]HOST:PORT")
    flag("--rounds", type=int)
    flag("--eval-every", "evaluate rounds 1, 1+N, 1+2N, ... and the last", type=int)
    flag("--task", "the task every worker and the evaluator must run, by the name their GetInfo reports "
         "(`jetfed tasks` on a board); the coordinator imports no task code", metavar="NAME")
    flag("--model", "the model the fleet must serve (default: the one it serves, the same on every board)",
         metavar="NAME")
    flag("--init-weights", "start round 1 from this safetensors state_dict of the fleet's model (default: a "
         "worker's freshly built weights for --seed); README 'Initial weights' shows how to make one",
         type=Path, metavar="FILE")
    flag("--optimizer", choices=OPTIMIZERS)
    flag("--lr", "learning rate of round 1", type=float)
    flag("--lr-decay", "lr multiplier per round (the reference's)", type=float)
    flag("--lr-min-factor", "lr never drops below this times --lr", type=float)
    flag("--momentum", type=float)
    flag("--batch-size", type=int)
    flag("--batches", "batches per epoch per round; 0 = all", type=int)
    flag("--epochs", type=int)
    flag("--seed", "seeds the initial model and every worker's shuffling", type=int)
    flag("--dp-noise-multiplier", "DP-SGD on every worker (needs opacus there): Gaussian noise of this times "
         "--dp-max-grad-norm on each step's sum of clipped per-example gradients; 0 = no DP", type=float,
         metavar="SIGMA")
    flag("--dp-max-grad-norm", "DP-SGD: each example's gradient clipped to this L2 norm", type=float, metavar="C")
    flag("--dp-delta", "DP-SGD: the delta each worker's epsilon is reported at, e.g. 1e-5", type=float)
    flag("--dp-epsilon-budget", "DP-SGD: a worker refuses a round that would take its epsilon for the run over "
         "this, and the run stops once every worker has; 0 = no budget", type=float, metavar="EPSILON")
    flag("--weighting", "FedAvg weights: examples trained, or equal", choices=WEIGHTINGS)
    flag("--strategy", "how updates become the next global model: " + ", ".join(PRESETS)
         + " (`jetfed strategies` lists them with their parameters)", metavar="NAME")
    p.add_argument("--strategy-param", action="append", metavar="KEY=VALUE", dest="strategy_param",
                   help="a strategy parameter, repeatable, e.g. --strategy-param momentum=0.7 (over [strategy]'s)")
    flag("--max-norm-ratio", "scale down an update whose change to the global model is over this multiple of "
         "the round's median change (needs 3 updates or more)", type=float)
    flag("--uplink-encoding", "how workers send their updates: raw (whole, fp32), or as the difference from the "
         "model they got, encoded: fp16, bf16, int8, int8-channel, topk:FRACTION (e.g. topk:0.05, with error "
         "feedback on the worker)", metavar="ENCODING")
    flag("--downlink-encoding", "how the global model goes to a worker holding an earlier one: raw (whole), or "
         "as the difference from it, encoded like --uplink-encoding", metavar="ENCODING")
    flag("--out", "output folder (default: runs/<timestamp>)", type=Path)
    flag("--chunk-bytes", type=int)
    flag("--max-payload-bytes", "largest update accepted from a worker (default: the model's size plus 10%% and 1 MiB)",
         type=int)
    flag("--round-timeout", "deadline of a round's training in seconds; later updates are discarded", type=float)
    flag("--eval-timeout", "deadline of each Evaluate call, seconds", type=float)
    flag("--connect-timeout", "how long to wait for services to come up, seconds", type=float)
    flag("--min-workers", "updates a round (and the start) needs: a number, or 'all' to require the whole fleet "
         "(default: a majority of the workers)", type=parse_min_workers, metavar="N|all")
    flag("--round-retries", "attempts after a round misses its quorum", type=int)
    flag("--max-backoff", "longest wait in seconds before a failed worker is asked again", type=float)
    flag("--max-concurrency", "Train calls in flight at once, 0 = every worker at once; each worker's "
         "--round-timeout starts when its call does. A round asking more workers than N folds each update into "
         "the new model as it arrives (mean-type strategies), so memory stays O(N) updates; one asking N or "
         "fewer is averaged as before, bit for bit. Asynchronous strategies (fedbuff, fedasync): at most N "
         "workers train at once, the others wait their turn", type=int, metavar="N")
    flag("--status-address", "serve jetfed.v1.Coordinator (GetStatus, WatchStatus) here, e.g. 127.0.0.1:8781",
         metavar="HOST:PORT")
    flag("--metrics-address", "serve Prometheus metrics at http://HOST:PORT/metrics, e.g. 0.0.0.0:9781",
         metavar="HOST:PORT")
    flag("--secure-aggregation", "the coordinator learns only the sum of the workers' updates (pairwise masks, "
         "Bonawitz et al. 2017): needs 3 workers or more and a sum-only strategy (fedavg, fedprox, fedavgm, "
         "fedadam, fedyogi, fedadagrad); updates are then neither scored nor screened one by one",
         action="store_true")
    flag("--secagg-threshold", "secure aggregation: workers whose shares rebuild a dropped worker's masks "
         "(0 = a majority; at most the workers less one)", type=int, metavar="T")
    flag("--secagg-clip", "secure aggregation: each update coordinate is clipped to [-CLIP, CLIP] before its "
         "fixed-point encoding (at least 1)", type=float, metavar="CLIP")
    flag("--secagg-max-workers", "secure aggregation: the most workers a round's sum holds, which sets the "
         "fixed-point scale (0 = the workers given)", type=int, metavar="N")
    flag("--resume", "continue the run in --out from its last checkpoint", action="store_true")
    flag("--log-level")
    tls.add_tls_arguments(p)
    add_token_argument(p)
    return p


def parse_args(argv: Optional[List[str]]) -> Dict[str, object]:
    """Defaults, then the config file, then the flags."""
    flags = vars(build_parser().parse_args(argv))
    config_path = flags.pop("config", None)
    from_file = load_config(config_path) if config_path else {}
    params = dict(from_file.get("strategy_params", {}))
    params.update(parse_param_flag(text) for text in flags.pop("strategy_param", []))
    return {**DEFAULTS, **from_file, **flags, "strategy_params": params}


def settings_from(values: Dict[str, Any]) -> RunSettings:
    workers: Dict[str, str] = {}
    for name, address in values["worker"]:
        if name in workers:
            raise InvalidConfig(f"worker: {name!r} given twice")
        workers[name] = address
    evaluator = values["evaluator"]
    if evaluator and "=" in evaluator:
        evaluator = evaluator.partition("=")[2]
    train = TrainConfig(
        optimizer=values["optimizer"], lr=values["lr"], momentum=values["momentum"],
        batch_size=values["batch_size"], max_batches=values["batches"], epochs=values["epochs"], seed=values["seed"],
        noise_multiplier=values["dp_noise_multiplier"], max_grad_norm=values["dp_max_grad_norm"],
        dp_delta=values["dp_delta"], epsilon_budget=values["dp_epsilon_budget"],
        uplink_encoding=values["uplink_encoding"],
    )
    out = values["out"]
    if values["min_workers"] == "all" and values["workers_dns"]:
        raise InvalidConfig("min_workers: 'all' needs a fixed list of workers; with --workers-dns give a number "
                            "(--min-workers N)")
    return RunSettings(
        workers=workers, evaluator=evaluator, workers_dns=values["workers_dns"],
        out_dir=Path(out) if out else Path("runs") / time.strftime("%Y%m%d-%H%M%S"),
        rounds=values["rounds"], eval_every=values["eval_every"], task=values["task"], model=values["model"],
        init_weights=Path(values["init_weights"]) if values["init_weights"] else None, train=train,
        lr_decay=values["lr_decay"], lr_min_factor=values["lr_min_factor"], weighting=values["weighting"],
        strategy=StrategySpec(values["strategy"], values["strategy_params"]),
        max_norm_ratio=values["max_norm_ratio"],
        chunk_bytes=values["chunk_bytes"], max_payload_bytes=values["max_payload_bytes"],
        round_timeout=values["round_timeout"], eval_timeout=values["eval_timeout"],
        connect_timeout=values["connect_timeout"],
        min_workers=len(workers) if values["min_workers"] == "all" else values["min_workers"],
        round_retries=values["round_retries"], max_backoff=values["max_backoff"],
        max_concurrency=values["max_concurrency"], resume=values["resume"],
        downlink_encoding=values["downlink_encoding"],
        status_address=values["status_address"], metrics_address=values["metrics_address"],
        secure_aggregation=values["secure_aggregation"], secagg_threshold=values["secagg_threshold"],
        secagg_clip=values["secagg_clip"], secagg_max_workers=values["secagg_max_workers"],
        tls=tls.TlsFiles.from_flags(values.get("tls_cert"), values.get("tls_key"), values.get("tls_ca")),
        token=read_token(values.get("token_file")),
    ).validated()


async def run_until_signal(settings: RunSettings, live: bool) -> RunSummary:
    """SIGINT or SIGTERM cancels the run between awaits: metrics and the checkpoint of
    the last whole round stay, channels close, and the process exits 0 (a systemd stop
    is routine; `--resume` continues)."""
    try:
        return await cancel_on_signals(run(settings, live=live))
    except asyncio.CancelledError:
        raise Stopped() from None


class Stopped(Exception):
    """The run was stopped by a signal; its last checkpoint allows --resume."""


# The coordinator's tensor work is elementwise passes over one update at a time
# (coordinator.blockwise), between gRPC reads on the event loop. torch's intra-op pool
# only adds wake-ups and spinning beside gRPC's own threads and the co-located
# services: a 32k-element float64 dot took 1.1 ms inside a loaded coordinator with
# the default pool and 8 us alone (bench/fleet_scale.py profile, 300 workers).
COORDINATOR_TORCH_THREADS = 1


def main(argv: Optional[List[str]] = None) -> int:
    logs.configure("INFO")
    # Before gRPC's threads start: they and the event loop then share one C heap (jetfed.allocator).
    allocator.limit_arenas()
    torch.set_num_threads(COORDINATOR_TORCH_THREADS)
    try:
        values = parse_args(argv)
        logging.getLogger().setLevel(str(values["log_level"]).upper())
        settings = settings_from(values)
        summary = asyncio.run(run_until_signal(settings, live=sys.stdout.isatty()))
    except JetfedError as exc:
        log.error("%s", exc)
        return 1
    except Stopped:
        log.warning("stopped by a signal; continue with --resume --out %s", settings.out_dir)
        return 0
    for line in summary_lines(summary, settings):
        print(line, flush=True)
    return 0


def summary_lines(summary: RunSummary, settings: RunSettings) -> List[str]:
    """The run's last words: timings, where the output is, and loudly, any configured
    worker that never answered or never contributed."""
    rounds = summary.train_seconds + summary.eval_seconds
    lines = [
        f"Run finished: {summary.rounds} rounds in {rounds:.1f}s "
        f"(training {summary.train_seconds:.1f}s = {summary.train_seconds / max(summary.rounds, 1):.3f}s/round, "
        f"evaluation {summary.eval_seconds:.1f}s); the fleet was ready in {summary.connect_seconds:.2f}s",
        f"Model: {summary.model_path}; metrics: {settings.out_dir / 'metrics.jsonl'}",
    ]
    if summary.never_contributed:
        absent = ", ".join(
            f"{name} ({summary.absent_at_start[name]})" if name in summary.absent_at_start else name
            for name in summary.never_contributed
        )
        lines.append(f"WARNING: {len(summary.never_contributed)} of {summary.workers} workers never contributed: "
                     f"{absent}; see 'failed' in metrics.jsonl")
    elif summary.absent_at_start:
        lines.append(f"Note: {', '.join(summary.absent_at_start)} did not answer at start but joined later")
    return lines
