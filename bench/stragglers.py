"""Stragglers: the seed recipe's fleet with charlie (digits 7-9) on a board 4x slower
(`slowdown = 4`: the worker sleeps 3x its training time before answering), run for real
(`tools/run_local.py`: worker, evaluator and coordinator processes over gRPC) with
synchronous `fedavg` and with asynchronous `fedbuff`. Reports the wall time at which
the global model first reaches --target accuracy, and the per-class recall at the end
(asynchronous FL is known to under-train the slow worker's classes).

Sync time is the sum of the rounds' training time up to the first evaluated round at
the target (evaluations, which block a synchronous round, are left out: in its favour);
async time is the elapsed time of the first evaluated version at the target
(evaluations run beside training).

    .venv/bin/python bench/stragglers.py --data-dir ../shared/datasets/mnist
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]


def config_with_straggler(source: Path, slow: str, factor: float, target: Path) -> None:
    """The config with `slowdown = factor` under [workers.<slow>]."""
    text = source.read_text()
    text, found = re.subn(rf"(\[workers\.{slow}\]\n)", rf"\1slowdown = {factor}\n", text)
    if not found:
        raise SystemExit(f"{source} has no [workers.{slow}]")
    target.write_text(text)


def run(config: Path, data_dir: Path, out: Path, rounds: int, eval_every: int, base_port: int,
        strategy: List[str]) -> List[Dict]:
    command = [sys.executable, str(ROOT / "tools" / "run_local.py"), "--config", str(config), "--data-dir",
               str(data_dir), "--out", str(out), "--rounds", str(rounds), "--base-port", str(base_port), "--",
               "--eval-every", str(eval_every), *strategy]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def summary(records: List[Dict], target: float, asynchronous: bool) -> Dict[str, object]:
    elapsed = 0.0
    reached: Optional[float] = None
    reached_at: Optional[int] = None
    for record in records:
        elapsed += record.get("train_s", 0.0)
        when = record["elapsed_s"] if asynchronous else elapsed
        metrics = record.get("evaluation", {}).get("global", {}).get("metrics", {})
        if reached is None and metrics.get("accuracy", 0.0) >= target:
            reached, reached_at = when, record["round"]
    last = [r for r in records if "evaluation" in r][-1]["evaluation"]["global"]["metrics"]
    stale = [u.get("staleness", 0) for r in records for u in r["updates"].values()]
    return {
        "seconds_to_target": None if reached is None else round(reached, 1), "at": reached_at,
        "final_accuracy": last["accuracy"], "updates": len(stale), "max_staleness": max(stale),
        "recall": {k.split("/", 1)[1]: round(v, 4) for k, v in last.items() if k.startswith("recall/")},
        "total_seconds": round(records[-1]["elapsed_s"] if asynchronous else elapsed, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--config", type=Path, default=ROOT / "examples" / "federation.toml")
    parser.add_argument("--slow", default="charlie")
    parser.add_argument("--slowdown", type=float, default=4.0)
    parser.add_argument("--target", type=float, default=0.95)
    parser.add_argument("--sync-rounds", type=int, default=40)
    parser.add_argument("--async-versions", type=int, default=80)
    parser.add_argument("--eval-every", type=int, default=2)
    parser.add_argument("--async-strategy", default="fedbuff", help="NAME[:KEY=VALUE,...]")
    parser.add_argument("--base-port", type=int, default=29777)
    parser.add_argument("--only", choices=("sync", "async"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="jetfed-stragglers-") as scratch:
        config = Path(scratch) / "federation.toml"
        config_with_straggler(args.config, args.slow, args.slowdown, config)
        name, _, params = args.async_strategy.partition(":")
        runs = {
            "sync": (["--strategy", "fedavg"], args.sync_rounds, False),
            "async": (["--strategy", name, *[a for p in params.split(",") if p for a in ("--strategy-param", p)]],
                      args.async_versions, True),
        }
        results = {}
        for label, (strategy, rounds, asynchronous) in runs.items():
            if args.only and label != args.only:
                continue
            records = run(config, args.data_dir, Path(scratch) / label, rounds, args.eval_every, args.base_port,
                          strategy)
            results[label] = {"strategy": " ".join(strategy), **summary(records, args.target, asynchronous)}
            print(json.dumps({"run": label, "slow": args.slow, "slowdown": args.slowdown, **results[label]}),
                  flush=True)
    if "sync" in results and "async" in results and results["async"]["seconds_to_target"] and \
            results["sync"]["seconds_to_target"]:
        ratio = results["async"]["seconds_to_target"] / results["sync"]["seconds_to_target"]
        print(json.dumps({"async_over_sync_time_to_target": round(ratio, 3)}))


if __name__ == "__main__":
    main()
