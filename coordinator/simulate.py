"""`jetfed simulate`: a federation in one process, through the same round loop,
strategies, screening, checkpoints and outputs as `jetfed coordinator`, with in-process
workers in place of boards, for experiments and studies of hundreds of workers.

The workers are the config's (`[workers.NAME]` with their labels, shard, dirichlet and
data_dir, as `make run-local` starts them), or with --workers N, N workers on the parts
1/N..N/N of the train split (IID, or Dirichlet(--dirichlet) per class). Every flag of
`jetfed coordinator` applies (--rounds, --seed, --strategy, --strategy-param, --out...).
For a synchronous strategy a simulation ends with the same weights as a real run of
the same config and seed."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from coordinator import cli as coordinator_cli
from coordinator.config_file import service_flags
from coordinator.federation import Fleet
from coordinator.local_fleet import ADDRESS, LocalEvaluator, LocalTrainer, LocalWorker, subset
from coordinator.runner import run
from coordinator.settings import RunSettings
from jetfed import devices, logs
from jetfed.data import resolve_data_dir
from jetfed.errors import InvalidConfig, JetfedError
from jetfed.partitions import Partition, add_partition_arguments, partition_from_flags
from jetfed.service_cli import add_task_arguments, task_from_args
from jetfed.tasks.base import Examples, Task

log = logging.getLogger("simulate")
MAX_WORKERS = 100_000


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="jetfed simulate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
        epilog="Any other flag is `jetfed coordinator`'s (see `jetfed coordinator --help`).",
    )
    p.add_argument("--config", type=Path, required=True, help="a federation.toml (its [task], [workers], "
                   "[evaluator], [strategy] and settings)")
    p.add_argument("--workers", type=int, metavar="N", help="simulate N workers on the shards 1/N..N/N of the "
                   "train split instead of the config's workers")
    p.add_argument("--dirichlet", type=float, metavar="ALPHA", help="with --workers: deal each class to the "
                   "workers in Dirichlet(ALPHA) proportions (0.1: few classes each; default: IID)")
    p.add_argument("--partition-seed", type=int, default=0, help="seed of the --workers split (default 0)")
    p.add_argument("--data-dir", type=Path, help="the task's data folder where the config names none "
                   "(default: $JETFED_DATA_DIR, else ./data)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1, as `make run-local` starts "
                   "each worker: the same count gives the same float sums, so a simulation and a real run of a "
                   "synchronous strategy end with the same weights)")
    p.add_argument("--score-updates", action="store_true", help="also score every worker's update on the test "
                   "set, as a real run does (default: the global model only)")
    return p


def _worker_parser() -> argparse.ArgumentParser:
    """The flags a worker reads its task and partition from (worker.cli's)."""
    p = argparse.ArgumentParser(add_help=False)
    add_task_arguments(p)
    add_partition_arguments(p)
    return p


def fleet_flags(config: Path, data_dir: Path, args: argparse.Namespace) -> Tuple[Dict[str, List[str]], str, List[str]]:
    """Each simulated worker's flags (as the launcher would start it), the evaluator's
    name and flags."""
    flags = service_flags(config, data_dir)
    evaluator = [name for name, f in flags.items() if "--labels" not in f]
    evaluator_name = evaluator[0]
    evaluator_flags = flags.pop(evaluator_name)
    if args.workers is not None:
        if not 1 <= args.workers <= MAX_WORKERS:
            raise InvalidConfig(f"--workers: {args.workers} must be in 1..{MAX_WORKERS}")
        common = list(evaluator_flags)
        width = len(str(args.workers))
        flags = {}
        for i in range(1, args.workers + 1):
            own = ["--shard", f"{i}/{args.workers}", "--partition-seed", str(args.partition_seed)]
            if args.dirichlet is not None:
                own += ["--dirichlet", str(args.dirichlet)]
            flags[f"w{i:0{width}d}"] = [*common, *own]
    elif args.dirichlet is not None:
        raise InvalidConfig("--dirichlet applies to --workers N; the config's workers take theirs from [workers.NAME]")
    return flags, evaluator_name, evaluator_flags


def build_fleet(config: Path, args: argparse.Namespace) -> Tuple[Fleet, LocalTrainer]:
    """The in-process fleet: one task and model, each worker's partition of the train
    split (loaded once per data folder), the evaluator's test split."""
    device = devices.resolve_device(args.device)
    data_dir = Path(resolve_data_dir(str(args.data_dir) if args.data_dir else None))
    flags, evaluator_name, evaluator_flags = fleet_flags(config, data_dir, args)
    parser = _worker_parser()
    tasks: Dict[str, Task] = {}
    everything: Dict[str, Examples] = {}

    def task_for(parsed: argparse.Namespace) -> Task:
        key = parsed.data_dir
        if key not in tasks:
            tasks[key] = task_from_args(parsed, device)
        return tasks[key]

    evaluator_args = parser.parse_args(evaluator_flags)
    evaluator_task = task_for(evaluator_args)
    trainer = LocalTrainer(evaluator_task, devices.describe(device))
    started = time.perf_counter()
    workers: Dict[str, LocalWorker] = {}
    for name, own in flags.items():
        parsed, _ = parser.parse_known_args(own)  # --slowdown emulates time, which a simulation does not keep
        task = task_for(parsed)
        partition = partition_from_flags(parsed.labels, parsed.shard, parsed.dirichlet, parsed.partition_seed,
                                         len(task.classes))
        if parsed.data_dir not in everything:
            everything[parsed.data_dir] = task.load("train", Partition())
        whole = everything[parsed.data_dir]
        data = whole if partition.is_everything() else None
        if data is None:
            data = subset(whole, partition.indices(whole.targets, len(task.classes)))
        if data is None:
            data = task.load("train", partition)
        workers[name] = LocalWorker(name, trainer, data)
    evaluator = LocalEvaluator(evaluator_name, trainer, evaluator_task.load("test", Partition()))
    log.info("simulating %d workers and the evaluator in process (data ready in %.1fs)", len(workers),
             time.perf_counter() - started)
    return Fleet(workers=workers, evaluator=evaluator), trainer


def main(argv: Optional[List[str]] = None) -> int:
    logs.configure("INFO")
    try:
        args, rest = build_parser().parse_known_args(argv)
        devices.set_threads(args.threads)
        fleet, trainer = build_fleet(args.config, args)
        values = coordinator_cli.parse_args(["--config", str(args.config), *rest])
        logging.getLogger().setLevel(str(values["log_level"]).upper())
        values["worker"] = [(name, ADDRESS) for name in fleet.workers]
        values["evaluator"] = ADDRESS
        for key in ("status_address", "metrics_address"):  # the config's ports serve its real run
            if f"--{key.replace('_', '-')}" not in rest:
                values[key] = None
        settings: RunSettings = coordinator_cli.settings_from(values)
        settings = dataclasses.replace(settings, score_updates=args.score_updates).validated()
        try:
            summary = asyncio.run(run(settings, fleet=fleet))
        finally:
            trainer.close()
    except JetfedError as exc:
        log.error("%s", exc)
        return 1
    for line in coordinator_cli.summary_lines(summary, settings):
        print(line, flush=True)
    return 0

if __name__ == "__main__":
    raise SystemExit(main())
