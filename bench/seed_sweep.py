"""The federation over real services for several seeds: round-40 accuracy swings by
points with the seed on this non-IID split, so one run proves little; the sweep's
mean and spread are the figures to report. Also times each run's start-up and rounds.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_once(data_dir: str, seed: int, rounds: int, base_port: int, out: Path) -> dict:
    completed = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "run_local.py"), "--data-dir", data_dir, "--rounds", str(rounds),
         "--seed", str(seed), "--out", str(out), "--base-port", str(base_port)],
        capture_output=True, text=True, check=False,
    )
    if completed.returncode != 0:
        raise SystemExit(f"seed {seed}: run-local failed ({completed.returncode}):\n{completed.stdout}\n{completed.stderr}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    ready = float(re.search(r"SERVING after ([\d.]+)s", completed.stdout).group(1))
    total = float(re.search(r"finished in ([\d.]+)s", completed.stdout).group(1))
    return {
        "seed": seed,
        "accuracy": records[-1]["evaluation"]["global"]["accuracy"],
        "startup_s": ready,
        "train_s": round(sum(r["train_s"] for r in records), 2),
        "eval_s": round(sum(r.get("eval_s", 0.0) for r in records), 2),
        "total_s": total,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--seeds", default="1-5", help="first-last")
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--base-port", type=int, default=18777)
    args = parser.parse_args()
    first, last = (int(x) for x in args.seeds.split("-"))
    results = []
    with tempfile.TemporaryDirectory() as scratch:
        for seed in range(first, last + 1):
            result = run_once(args.data_dir, seed, args.rounds, args.base_port, Path(scratch) / f"seed{seed}")
            print(json.dumps(result), flush=True)
            results.append(result)
    accuracies = [r["accuracy"] for r in results]
    print(json.dumps({
        "bench": "seed_sweep", "seeds": args.seeds, "rounds": args.rounds,
        "mean_accuracy": round(statistics.mean(accuracies), 4),
        "stdev_accuracy": round(statistics.stdev(accuracies), 4) if len(accuracies) > 1 else 0.0,
        "min_accuracy": min(accuracies), "max_accuracy": max(accuracies),
        "mean_train_s_per_round": round(statistics.mean(r["train_s"] for r in results) / args.rounds, 4),
        "mean_startup_s": round(statistics.mean(r["startup_s"] for r in results), 2),
    }))


if __name__ == "__main__":
    main()
