"""Every strategy on the seed recipe (3 workers: digits 0-3, 4-6, 7-9; 40 rounds of 10
batches of 32), seeds 1-5, through `jetfed simulate` (the real round loop with
in-process workers; for synchronous strategies the same weights as a real run). Prints
one JSON line per run and a table of the round-40 accuracy per strategy.

    .venv/bin/python bench/strategies.py --data-dir ../shared/datasets/mnist
    .venv/bin/python bench/strategies.py --data-dir ... --strategy fedavgm:momentum=0.8,server_lr=1 --seeds 1

A strategy is NAME or NAME:KEY=VALUE,KEY=VALUE (its --strategy-param values)."""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, Tuple

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from coordinator.strategies.registry import PRESETS  # noqa: E402
# Every synchronous strategy at its defaults, except Krum's f: with the seed recipe's 3
# workers Krum can only take f = 0 (it needs 2f+3 updates).
SYNCHRONOUS = [name if not name.endswith("krum") else f"{name}:f=0"
               for name, preset in PRESETS.items() if not preset.asynchronous]


def parse_strategy(text: str) -> Tuple[str, List[str]]:
    name, _, params = text.partition(":")
    return name, [p for p in params.split(",") if p]


def run_one(config: Path, data_dir: Path, strategy: str, seed: int, rounds: int, extra: List[str]) -> Dict:
    name, params = parse_strategy(strategy)
    with tempfile.TemporaryDirectory(prefix="jetfed-strategies-") as out:
        command = [sys.executable, "-m", "coordinator.simulate", "--config", str(config), "--data-dir", str(data_dir),
                   "--out", out, "--rounds", str(rounds), "--seed", str(seed), "--eval-every", str(rounds),
                   "--strategy", name, *[a for p in params for a in ("--strategy-param", p)], *extra]
        started = time.perf_counter()
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
        seconds = time.perf_counter() - started
        if done.returncode != 0:
            return {"strategy": strategy, "seed": seed, "error": done.stderr.strip().splitlines()[-1:]}
        last = [json.loads(line) for line in Path(out, "metrics.jsonl").read_text().splitlines()][-1]
    metrics = last["evaluation"]["global"]["metrics"]
    return {"strategy": strategy, "seed": seed, "rounds": rounds, "accuracy": metrics["accuracy"],
            "recall_7_9": min(metrics.get(f"recall/{d}", 0.0) for d in "789"), "seconds": round(seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--config", type=Path, default=ROOT / "examples" / "federation.toml")
    parser.add_argument("--strategy", action="append", help="repeatable (default: every synchronous strategy)")
    parser.add_argument("--seeds", default="1-5", help="e.g. 1-5 or 1,3")
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--parallel", type=int, default=2, help="simulations at once (each on one thread)")
    parser.add_argument("--json", type=Path, help="also write every run's line here")
    args, extra = parser.parse_known_args()
    low, _, high = args.seeds.partition("-")
    seeds = list(range(int(low), int(high) + 1)) if high else [int(s) for s in args.seeds.split(",")]
    strategies = args.strategy or list(SYNCHRONOUS)
    jobs = [(s, seed) for s in strategies for seed in seeds]
    results: List[Dict] = []
    with ThreadPoolExecutor(args.parallel) as pool:
        for result in pool.map(lambda job: run_one(args.config, args.data_dir, job[0], job[1], args.rounds, extra),
                               jobs):
            print(json.dumps(result), flush=True)
            results.append(result)
    if args.json:
        args.json.write_text("".join(json.dumps(r) + "\n" for r in results))
    print(f"\n| strategy | round-{args.rounds} accuracy, seeds {args.seeds} | mean | min recall 7-9 |")
    print("|---|---|---|---|")
    for strategy in strategies:
        runs = [r for r in results if r["strategy"] == strategy and "accuracy" in r]
        if not runs:
            print(f"| {strategy} | failed: {[r.get('error') for r in results if r['strategy'] == strategy][:1]} | | |")
            continue
        accuracies = ", ".join(f"{100 * r['accuracy']:.2f}" for r in runs)
        print(f"| {strategy} | {accuracies} | {100 * statistics.mean(r['accuracy'] for r in runs):.2f}% | "
              f"{100 * min(r['recall_7_9'] for r in runs):.1f}% |")


if __name__ == "__main__":
    main()
