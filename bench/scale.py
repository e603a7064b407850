"""Many workers from one coordinator: `jetfed simulate` with 1,000 workers on the IID
shards of MNIST's train split (60 examples each), sampling 10 or 100 of them a round,
mnist-cnn and the seed recipe. Prints one JSON line per sample size with the mean time
per round (training and aggregation, evaluation excluded), the peak memory of the
simulation and the global model's accuracy at the last round.

    .venv/bin/python bench/scale.py --data-dir ../shared/datasets/mnist [--workers 1000] [--rounds 10]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--workers", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--sample", type=int, action="append", help="workers a round (default: 10 and 100)")
    parser.add_argument("--strategy", default="fedavg")
    args = parser.parse_args()
    for sample in sorted(args.sample or [10, 100]):
        with tempfile.TemporaryDirectory(prefix="jetfed-scale-") as out:
            command = [sys.executable, "-m", "coordinator.simulate", "--config", str(ROOT / "examples" / "federation.toml"),
                       "--data-dir", str(args.data_dir), "--workers", str(args.workers), "--out", out,
                       "--rounds", str(args.rounds), "--eval-every", str(args.rounds), "--strategy", args.strategy,
                       "--strategy-param", f"sample={sample}"]
            done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(done.stderr[-3000:])
            peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
            records = [json.loads(line) for line in Path(out, "metrics.jsonl").read_text().splitlines()]
        # round 1 pays torch's first-call costs; the others are the steady state
        train = [r["train_s"] for r in records[1:]] or [records[0]["train_s"]]
        print(json.dumps({
            "bench": "scale", "workers": args.workers, "sample": sample, "rounds": args.rounds,
            "strategy": args.strategy, "seconds_per_round": round(statistics.mean(train), 3),
            "seconds_per_round_max": round(max(train), 3), "first_round_s": round(records[0]["train_s"], 3),
            # the largest simulation so far (samples run in increasing size)
            "peak_rss_mib": round(peak / 1024),
            "accuracy": records[-1]["evaluation"]["global"]["accuracy"],
        }), flush=True)


if __name__ == "__main__":
    main()
