"""DP-SGD on the seed split (3 workers: digits 0-3, 4-6, 7-9) through `jetfed simulate`
(the real round loop, in-process workers training with jetfed.privacy as a board does):
the accuracy-epsilon curve, each worker's epsilon at delta (default 1e-5) from its own
RDP accountant. Prints one JSON line per run, then for each run the accuracy of the
last evaluated round whose epsilon (the largest of the three workers') is at most 1, 2,
3, ... and the best accuracy at epsilon <= --target-epsilon (the issue's target: 96.0%
at epsilon 3 within 100 rounds).

    nice -n 15 .venv/bin/python bench/privacy.py --data-dir ../shared/datasets/mnist
    nice -n 15 .venv/bin/python bench/privacy.py --data-dir ... --noise-multiplier 1.1 --batch-size 512 \\
        --batches 3 --lr 2 --seeds 1-3 --parallel 2

Any other flag goes to `jetfed simulate` (e.g. --strategy fedavgm, --momentum 0.5)."""

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
from typing import Dict, List, Optional, Tuple

ROOT = Path(__file__).resolve().parents[1]


def run_one(args: argparse.Namespace, seed: int, extra: List[str]) -> Dict:
    with tempfile.TemporaryDirectory(prefix="jetfed-privacy-") as out:
        command = [sys.executable, "-m", "coordinator.simulate", "--config", str(args.config),
                   "--data-dir", str(args.data_dir), "--out", out, "--rounds", str(args.rounds),
                   "--seed", str(seed), "--eval-every", str(args.eval_every),
                   "--batch-size", str(args.batch_size), "--batches", str(args.batches), "--lr", str(args.lr),
                   "--lr-decay", str(args.lr_decay),
                   "--dp-noise-multiplier", str(args.noise_multiplier), "--dp-max-grad-norm", str(args.max_grad_norm),
                   "--dp-delta", str(args.delta), *extra]
        started = time.perf_counter()
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
        seconds = time.perf_counter() - started
        if done.returncode != 0:
            return {"seed": seed, "error": done.stderr.strip().splitlines()[-3:]}
        records = [json.loads(line) for line in Path(out, "metrics.jsonl").read_text().splitlines()]
    curve = [(r["round"], r["privacy"]["max_epsilon"], r["evaluation"]["global"]["metrics"]["accuracy"])
             for r in records if r.get("evaluation") and "global" in r["evaluation"]]
    return {"seed": seed, "seconds": round(seconds, 1), "curve": curve,
            "final_epsilon": {w: round(e, 4) for w, e in records[-1]["privacy"]["epsilon"].items()}}


def at_epsilon(curve: List[Tuple[int, float, float]], bound: float) -> Optional[Tuple[int, float, float]]:
    """The last evaluated round whose epsilon is at most `bound` (epsilon only grows)."""
    within = [point for point in curve if point[1] <= bound]
    return within[-1] if within else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--config", type=Path, default=ROOT / "examples" / "federation.toml")
    parser.add_argument("--seeds", default="1", help="e.g. 1-5 or 1,3")
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--eval-every", type=int, default=5)
    parser.add_argument("--noise-multiplier", type=float, default=0.91)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--batch-size", type=int, default=256, help="the expected Poisson batch")
    parser.add_argument("--batches", type=int, default=5, help="steps per round and worker")
    parser.add_argument("--lr", type=float, default=3.0)
    parser.add_argument("--lr-decay", type=float, default=0.97)
    parser.add_argument("--target-epsilon", type=float, default=3.0)
    parser.add_argument("--target-accuracy", type=float, default=0.96)
    parser.add_argument("--parallel", type=int, default=1, help="simulations at once (each on one thread)")
    parser.add_argument("--json", type=Path, help="also write every run's line here")
    args, extra = parser.parse_known_args()
    low, _, high = args.seeds.partition("-")
    seeds = list(range(int(low), int(high) + 1)) if high else [int(s) for s in args.seeds.split(",")]
    results: List[Dict] = []
    with ThreadPoolExecutor(args.parallel) as pool:
        for result in pool.map(lambda seed: run_one(args, seed, extra), seeds):
            print(json.dumps(result), flush=True)
            results.append(result)
    if args.json:
        args.json.write_text("".join(json.dumps(r) + "\n" for r in results))
    recipe = (f"sigma {args.noise_multiplier:g}, C {args.max_grad_norm:g}, batch {args.batch_size} x {args.batches} "
              f"steps a round, lr {args.lr:g} (decay {args.lr_decay:g}), delta {args.delta:g} {' '.join(extra)}")
    print(f"\nDP-SGD on the seed split: {recipe}")
    print("| seed | " + " | ".join(f"eps <= {k}" for k in range(1, int(args.target_epsilon) + 2)) + " | rounds run |")
    print("|---" * (int(args.target_epsilon) + 3) + "|")
    best: List[float] = []
    for result in results:
        if "curve" not in result:
            print(f"| {result['seed']} | failed: {result.get('error')} |")
            continue
        cells = []
        for k in range(1, int(args.target_epsilon) + 2):
            point = at_epsilon(result["curve"], float(k))
            cells.append(f"{100 * point[2]:.2f}% (round {point[0]}, eps {point[1]:.2f})" if point else "-")
        print(f"| {result['seed']} | " + " | ".join(cells) + f" | {result['curve'][-1][0]} |")
        within = [acc for _, eps, acc in result["curve"] if eps <= args.target_epsilon]
        best.append(max(within) if within else 0.0)
    if best:
        reached = sum(acc >= args.target_accuracy for acc in best)
        print(f"\nbest accuracy at epsilon <= {args.target_epsilon:g}: "
              + ", ".join(f"{100 * acc:.2f}%" for acc in best)
              + f" (mean {100 * statistics.mean(best):.2f}%); target {100 * args.target_accuracy:.1f}% reached by "
              f"{reached} of {len(best)} seeds")


if __name__ == "__main__":
    main()
