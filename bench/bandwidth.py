"""Bytes per round and round-40 accuracy of each weight encoding (issue 12) on the seed
recipe (examples/federation.toml: 3 workers, digits 0-3, 4-6, 7-9; 40 rounds of 10
batches of 32; fedavg), through the `jetfed simulate` fleet (the real round loop with
in-process workers that encode, decode and keep top-k residuals as boards and the
coordinator's client do). Each run is a child process; prints one JSON line per run
and a table: mean bytes per round both directions (all workers), the ratio to fp32,
and the round-40 accuracy, mean over seeds.

    nice -n 15 .venv/bin/python bench/bandwidth.py --data-dir ../shared/datasets/mnist
    ... --mode fp32 --mode int8 --seeds 1-2 --rounds 40

A mode is NAME=UPLINK/DOWNLINK (e.g. topk1=topk:0.01/topk:0.01), or one of MODES'
names. Round 1 always sends the whole model down (no worker holds one yet): it is
counted in the mean.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
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

MODES: Dict[str, Tuple[str, str]] = {
    "fp32": ("raw", "raw"),
    "fp16": ("fp16", "fp16"),
    "int8": ("int8", "int8"),
    "int8-channel": ("int8-channel", "int8-channel"),
    "topk10": ("topk:0.1", "topk:0.1"),
    "topk7": ("topk:0.07", "topk:0.07"),
    "topk5": ("topk:0.05", "topk:0.05"),
    "topk1": ("topk:0.01", "topk:0.01"),
}


def parse_mode(text: str) -> Tuple[str, str, str]:
    if text in MODES:
        return (text, *MODES[text])
    name, _, rest = text.partition("=")
    up, _, down = rest.partition("/")
    if not (name and up and down):
        raise SystemExit(f"--mode {text!r}: give a name of {', '.join(MODES)} or NAME=UPLINK/DOWNLINK")
    return name, up, down


def simulate_one(config: Path, data_dir: Path, out: Path, seed: int, rounds: int, up: str, down: str) -> None:
    """In the child: `jetfed simulate` as coordinator/simulate.py runs it, with the
    run's uplink and downlink encodings set on its settings."""
    from coordinator import cli as coordinator_cli
    from coordinator import simulate
    from coordinator.local_fleet import ADDRESS
    from coordinator.runner import run
    from jetfed import devices, logs

    logs.configure("WARNING")
    args, _ = simulate.build_parser().parse_known_args(["--config", str(config), "--data-dir", str(data_dir)])
    devices.set_threads(1)
    fleet, trainer = simulate.build_fleet(config, args)
    values = coordinator_cli.parse_args(["--config", str(config), "--out", str(out), "--rounds", str(rounds),
                                         "--seed", str(seed), "--eval-every", str(rounds)])
    values["worker"] = [(name, ADDRESS) for name in fleet.workers]
    values["evaluator"] = ADDRESS
    values["status_address"] = values["metrics_address"] = None
    settings = coordinator_cli.settings_from(values)
    settings = dataclasses.replace(settings, score_updates=False, downlink_encoding=down,
                                   train=dataclasses.replace(settings.train, uplink_encoding=up)).validated()
    try:
        asyncio.run(run(settings, fleet=fleet, live=False))
    finally:
        trainer.close()


def run_one(config: Path, data_dir: Path, mode: Tuple[str, str, str], seed: int, rounds: int) -> Dict:
    name, up, down = mode
    with tempfile.TemporaryDirectory(prefix="jetfed-bandwidth-") as out:
        command = [sys.executable, str(Path(__file__).resolve()), "--child", str(config), str(data_dir), out,
                   str(seed), str(rounds), up, down]
        started = time.perf_counter()
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
        seconds = time.perf_counter() - started
        if done.returncode != 0:
            return {"mode": name, "seed": seed, "error": done.stderr.strip().splitlines()[-3:]}
        records = [json.loads(line) for line in Path(out, "metrics.jsonl").read_text().splitlines()]
    per_round = [(sum(u["bytes_sent"] for u in r["updates"].values()),
                  sum(u["bytes_received"] for u in r["updates"].values())) for r in records if r.get("updates")]
    metrics = records[-1]["evaluation"]["global"]["metrics"]
    return {"mode": name, "uplink": up, "downlink": down, "seed": seed, "rounds": rounds,
            "accuracy": metrics["accuracy"],
            "down_bytes_per_round": statistics.mean(d for d, _ in per_round),
            "up_bytes_per_round": statistics.mean(u for _, u in per_round),
            "seconds": round(seconds, 1)}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        config, data_dir, out, seed, rounds, up, down = sys.argv[2:9]
        simulate_one(Path(config), Path(data_dir), Path(out), int(seed), int(rounds), up, down)
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--config", type=Path, default=ROOT / "examples" / "federation.toml")
    parser.add_argument("--mode", action="append", help="repeatable (default: every one of MODES)")
    parser.add_argument("--seeds", default="1-5", help="e.g. 1-5 or 1,3")
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--parallel", type=int, default=2, help="simulations at once (each on one thread)")
    parser.add_argument("--json", type=Path, help="also write every run's line here")
    args = parser.parse_args()
    low, _, high = args.seeds.partition("-")
    seeds = list(range(int(low), int(high) + 1)) if high else [int(s) for s in args.seeds.split(",")]
    modes = [parse_mode(m) for m in (args.mode or list(MODES))]
    jobs = [(m, seed) for m in modes for seed in seeds]
    results: List[Dict] = []
    with ThreadPoolExecutor(args.parallel) as pool:
        for result in pool.map(lambda job: run_one(args.config, args.data_dir, job[0], job[1], args.rounds), jobs):
            print(json.dumps(result), flush=True)
            results.append(result)
    if args.json:
        args.json.write_text("".join(json.dumps(r) + "\n" for r in results))
    table(results, modes, args.seeds, args.rounds)


def table(results: List[Dict], modes: List[Tuple[str, str, str]], seeds: str, rounds: int) -> None:
    ok = [r for r in results if "error" not in r]
    base = [r for r in ok if r["uplink"] == "raw" and r["downlink"] == "raw"]
    base_bytes = statistics.mean(r["down_bytes_per_round"] + r["up_bytes_per_round"] for r in base) if base else None
    base_accuracy = statistics.mean(r["accuracy"] for r in base) if base else None
    print(f"\n| mode (up / down) | bytes/round down | up | ratio to fp32 | round-{rounds} accuracy, seeds {seeds} "
          "| mean | vs fp32 (points) |")
    print("|---|---|---|---|---|---|---|")
    for name, up, down in modes:
        runs = [r for r in ok if r["mode"] == name]
        if not runs:
            print(f"| {name} ({up} / {down}) | failed | | | | | |")
            continue
        d = statistics.mean(r["down_bytes_per_round"] for r in runs)
        u = statistics.mean(r["up_bytes_per_round"] for r in runs)
        acc = statistics.mean(r["accuracy"] for r in runs)
        ratio = f"{base_bytes / (d + u):.1f}x" if base_bytes else "-"
        gap = f"{100 * (acc - base_accuracy):+.2f}" if base_accuracy is not None else "-"
        each = ", ".join(f"{100 * r['accuracy']:.2f}" for r in runs)
        print(f"| {name} ({up} / {down}) | {d:,.0f} | {u:,.0f} | {ratio} | {each} | {100 * acc:.2f}% | {gap} |")


if __name__ == "__main__":
    main()
