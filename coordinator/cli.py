"""`jetfed coordinator`: run a federation over workers and an evaluator given by flags."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import time
from pathlib import Path
from typing import Dict, List, Optional

from coordinator.federation import RunSummary
from coordinator.runner import run
from coordinator.settings import WEIGHTINGS, RunSettings
from jetfed import logs, stream
from jetfed.config import OPTIMIZERS, TrainConfig
from jetfed.errors import InvalidConfig, JetfedError
from jetfed.models import DEFAULT_MODEL, model_names

log = logging.getLogger("coordinator")


def parse_endpoint(value: str) -> tuple:
    name, sep, address = value.partition("=")
    if not sep or not name or ":" not in address:
        raise argparse.ArgumentTypeError(f"{value!r} is not NAME=HOST:PORT")
    return name, address


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    defaults = TrainConfig()
    p = argparse.ArgumentParser(prog="jetfed coordinator", description=__doc__)
    p.add_argument("--worker", action="append", type=parse_endpoint, default=[], metavar="NAME=HOST:PORT",
                   help="a worker to train on (repeat for each)")
    p.add_argument("--evaluator", metavar="[NAME=]HOST:PORT", help="the evaluator scoring models on the test set")
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--eval-every", type=int, default=10, help="evaluate rounds 1, 1+N, 1+2N, ... and the last")
    p.add_argument("--model", default=DEFAULT_MODEL, choices=model_names())
    p.add_argument("--optimizer", default=defaults.optimizer, choices=OPTIMIZERS)
    p.add_argument("--lr", type=float, default=defaults.lr, help="learning rate of round 1")
    p.add_argument("--lr-decay", type=float, default=0.98, help="lr multiplier per round (the reference's 0.98)")
    p.add_argument("--lr-min-factor", type=float, default=0.01, help="lr never drops below this times --lr")
    p.add_argument("--momentum", type=float, default=defaults.momentum)
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    p.add_argument("--batches", type=int, default=defaults.max_batches, help="batches per epoch per round; 0 = all")
    p.add_argument("--epochs", type=int, default=defaults.epochs)
    p.add_argument("--seed", type=int, default=1, help="seeds the initial model and every worker's shuffling")
    p.add_argument("--weighting", default="examples", choices=WEIGHTINGS, help="FedAvg weights: examples trained, or equal")
    p.add_argument("--out", type=Path, help="output folder (default: runs/<timestamp>)")
    p.add_argument("--chunk-bytes", type=int, default=stream.DEFAULT_CHUNK_BYTES)
    p.add_argument("--max-payload-bytes", type=int, default=stream.DEFAULT_MAX_PAYLOAD_BYTES)
    p.add_argument("--round-timeout", type=float, default=300.0,
                   help="deadline of a round's training, seconds: later updates are discarded")
    p.add_argument("--eval-timeout", type=float, default=300.0, help="deadline of each Evaluate call, seconds")
    p.add_argument("--connect-timeout", type=float, default=60.0, help="how long to wait for services to come up")
    p.add_argument("--min-workers", type=int, help="updates a round needs (default: a majority of the workers)")
    p.add_argument("--round-retries", type=int, default=3, help="attempts after a round misses its quorum")
    p.add_argument("--max-backoff", type=float, default=30.0, help="longest wait before a failed worker is asked again")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--log-level", default="INFO")
    return p.parse_args(argv)


def settings_from(args: argparse.Namespace) -> RunSettings:
    workers: Dict[str, str] = {}
    for name, address in args.worker:
        if name in workers:
            raise InvalidConfig(f"worker: {name!r} given twice")
        workers[name] = address
    evaluator = args.evaluator.partition("=")[2] if args.evaluator and "=" in args.evaluator else args.evaluator
    train = TrainConfig(
        optimizer=args.optimizer, lr=args.lr, momentum=args.momentum, batch_size=args.batch_size,
        max_batches=args.batches, epochs=args.epochs, seed=args.seed,
    )
    return RunSettings(
        workers=workers, evaluator=evaluator,
        out_dir=args.out or Path("runs") / time.strftime("%Y%m%d-%H%M%S"),
        rounds=args.rounds, eval_every=args.eval_every, model=args.model, train=train,
        lr_decay=args.lr_decay, lr_min_factor=args.lr_min_factor, weighting=args.weighting,
        chunk_bytes=args.chunk_bytes, max_payload_bytes=args.max_payload_bytes,
        round_timeout=args.round_timeout, eval_timeout=args.eval_timeout, connect_timeout=args.connect_timeout,
        min_workers=args.min_workers, round_retries=args.round_retries, max_backoff=args.max_backoff,
        resume=args.resume,
    ).validated()


async def run_until_signal(settings: RunSettings) -> RunSummary:
    """SIGINT or SIGTERM cancels the run between awaits: metrics and the checkpoint of
    the last whole round stay, channels close, and the process exits 0 (a systemd stop
    is routine; `--resume` continues)."""
    task = asyncio.ensure_future(run(settings))
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, task.cancel)
    try:
        return await task
    except asyncio.CancelledError:
        raise Stopped() from None


class Stopped(Exception):
    """The run was stopped by a signal; its last checkpoint allows --resume."""


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    logs.configure(args.log_level)
    try:
        settings = settings_from(args)
        summary = asyncio.run(run_until_signal(settings))
    except JetfedError as exc:
        log.error("%s", exc)
        return 1
    except Stopped:
        log.warning("stopped by a signal; continue with --resume --out %s", settings.out_dir)
        return 0
    rounds = summary.train_seconds + summary.eval_seconds
    print(
        f"Run finished: {summary.rounds} rounds in {rounds:.1f}s "
        f"(training {summary.train_seconds:.1f}s = {summary.train_seconds / summary.rounds:.3f}s/round, "
        f"evaluation {summary.eval_seconds:.1f}s), services ready after {summary.connect_seconds:.1f}s",
        flush=True,
    )
    print(f"Model: {summary.model_path}; metrics: {settings.out_dir / 'metrics.jsonl'}", flush=True)
    return 0
