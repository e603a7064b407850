"""Loopback round time with and without --secure-aggregation (issue 12's target: at most
10% added). The seed recipe (examples/federation.toml: 3 workers on digits 0-3, 4-6,
7-9, mnist-cnn, 10 batches of 32 a round, lr 0.1, fedavg) on real `jetfed worker`
processes over loopback gRPC, one torch thread each, no evaluator (the round only:
training, both transfers, masking, the unmask round trip, unmasking, the step). Runs
alternate plain and secure on the same workers, so load drifts hit both; each round's
train_s comes from metrics.jsonl, round 1 (warm-up, and for secure runs the key setup
is before it) left out; the median per mode and the ratio are printed.

    nice -n 15 .venv/bin/python bench/secagg_round.py --data-dir /work/shared/datasets/mnist
    ... --pairs 3 --rounds 11
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from coordinator.runner import run  # noqa: E402
from coordinator.settings import RunSettings  # noqa: E402
from jetfed.config import TrainConfig  # noqa: E402
from tests.integration.processes import START_TIMEOUT_S, start, stop, wait_serving  # noqa: E402

LABELS = {"alice": "0-3", "bob": "4-6", "charlie": "7-9"}
RECIPE = TrainConfig(optimizer="sgd", lr=0.1, momentum=0.0, batch_size=32, max_batches=10, epochs=1, seed=1)


def round_times(workers: Dict[str, str], out: Path, secure: bool, rounds: int) -> List[float]:
    settings = RunSettings(workers=workers, evaluator=None, out_dir=out, rounds=rounds, eval_every=rounds,
                           train=RECIPE, secure_aggregation=secure, round_retries=0).validated()
    asyncio.run(run(settings, say=lambda line: None))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    if secure:
        assert all(sorted(r["secure_aggregation"]["survivors"]) == sorted(workers) for r in records)
    return [r["train_s"] for r in records[1:]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, required=True, help="the MNIST IDX files")
    parser.add_argument("--pairs", type=int, default=3, help="plain and secure runs, alternating")
    parser.add_argument("--rounds", type=int, default=11, help="rounds per run (the first is not counted)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        logs = Path(folder)
        processes = [start(name, ["worker", "--name", name, "--labels", labels, "--data-dir", str(args.data_dir),
                                  "--no-download", "--threads", "1", "--state-dir", str(logs / name)], logs)
                     for name, labels in LABELS.items()]
        try:
            deadline = time.monotonic() + START_TIMEOUT_S
            for process in processes:
                wait_serving(process, deadline)
            workers = {p.name: p.address for p in processes}
            times: Dict[str, List[float]] = {"plain": [], "secure": []}
            for pair in range(args.pairs):
                for mode in ("plain", "secure"):
                    measured = round_times(workers, logs / f"{mode}-{pair}", mode == "secure", args.rounds)
                    times[mode] += measured
                    print(json.dumps({"pair": pair, "mode": mode, "median_s": statistics.median(measured),
                                      "rounds_s": [round(t, 4) for t in measured]}), flush=True)
        finally:
            stop(processes)
    plain, secure = statistics.median(times["plain"]), statistics.median(times["secure"])
    print(f"plain  {plain:.3f} s a round (median of {len(times['plain'])} rounds)")
    print(f"secure {secure:.3f} s a round (median of {len(times['secure'])} rounds)")
    print(f"ratio  {secure / plain:.3f} (target <= 1.10)")


if __name__ == "__main__":
    main()
