"""Robust aggregation under attack: 10 workers on IID shards of MNIST's train split,
the last 2 hostile (bench/hostile.py: sign-flip, noise, alie, label-flip, or none), the
seed recipe's 40 rounds of 10 batches of 32, through `jetfed simulate`'s fleet (the real
round loop, screening included). Prints one JSON line per (strategy, attack) with the
round-40 accuracy, and a table.

    .venv/bin/python bench/attacks.py --data-dir ../shared/datasets/mnist [--parallel 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Dict, List, Tuple

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

STRATEGIES = ("fedavg", "median", "trimmed-mean", "multi-krum", "centered-clip")


def run_one(job: Tuple[str, str, str, int, int, int, int]) -> Dict[str, object]:
    strategy, attack, data_dir, rounds, workers, hostile, seed = job
    import dataclasses
    import logging
    import time

    import torch

    from coordinator import cli as coordinator_cli
    from coordinator.federation import Fleet
    from coordinator.local_fleet import ADDRESS
    from coordinator.runner import run
    from coordinator.simulate import build_fleet, build_parser
    from hostile import corrupt

    torch.set_num_threads(1)
    logging.disable(logging.WARNING)
    config = ROOT / "examples" / "federation.toml"
    args = build_parser().parse_args(["--config", str(config), "--workers", str(workers), "--data-dir", data_dir])
    fleet, trainer = build_fleet(config, args)
    fleet = Fleet(workers=corrupt(fleet.workers, attack, hostile), evaluator=fleet.evaluator)
    with tempfile.TemporaryDirectory(prefix="jetfed-attacks-") as out:
        params = [] if strategy == "fedavg" else ["--strategy-param", f"f={hostile}"]
        values = coordinator_cli.parse_args(["--config", str(config), "--rounds", str(rounds), "--seed", str(seed),
                                             "--eval-every", str(rounds), "--out", out, "--strategy", strategy,
                                             *params, "--min-workers", str(workers)])
        values.update(worker=[(n, ADDRESS) for n in fleet.workers], evaluator=ADDRESS, status_address=None)
        settings = dataclasses.replace(coordinator_cli.settings_from(values), score_updates=False)
        started = time.perf_counter()
        summary = asyncio.run(run(settings, say=lambda line: None, fleet=fleet))
        seconds = time.perf_counter() - started
    trainer.close()
    assert summary.final_score is not None
    return {"strategy": strategy, "attack": attack, "hostile": hostile, "workers": workers, "seed": seed,
            "accuracy": summary.final_score.accuracy, "seconds": round(seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--workers", type=int, default=10)
    parser.add_argument("--hostile", type=int, default=2)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--strategy", action="append", help="repeatable (default: fedavg and the robust rules)")
    parser.add_argument("--attack", action="append", help="repeatable (default: all)")
    parser.add_argument("--parallel", type=int, default=2)
    args = parser.parse_args()
    from hostile import ATTACKS

    jobs = [(s, a, args.data_dir, args.rounds, args.workers, args.hostile, args.seed)
            for s in (args.strategy or STRATEGIES) for a in (args.attack or ATTACKS)]
    results: List[Dict[str, object]] = []
    with ProcessPoolExecutor(args.parallel) as pool:
        for result in pool.map(run_one, jobs):
            print(json.dumps(result), flush=True)
            results.append(result)
    attacks = list(dict.fromkeys(str(r["attack"]) for r in results))
    print(f"\n| strategy | {' | '.join(attacks)} |\n|---|{'---|' * len(attacks)}")
    for strategy in dict.fromkeys(str(r["strategy"]) for r in results):
        row = {str(r["attack"]): r["accuracy"] for r in results if r["strategy"] == strategy}
        print(f"| {strategy} | " + " | ".join(f"{100 * float(row[a]):.2f}%" for a in attacks) + " |")


if __name__ == "__main__":
    main()
