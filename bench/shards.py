"""The reference recipe on a fleet of 10 shards: does the same federation learn when
MNIST's training set is cut into 10 IID parts (`--shard i/10`), or into 10 non-IID
parts (`--shard i/10 --dirichlet 0.5`), each held by its own worker process?

Starts an evaluator and 10 real workers on free loopback ports (one torch thread
each), runs the real coordinator for `--rounds` rounds, and prints one JSON line per
split with the global model's accuracy at each evaluated round, the wall time and
each worker's examples.

    .venv/bin/python bench/shards.py --data-dir ../shared/datasets/mnist [--rounds 40] [--split iid|dirichlet]
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

SHARDS = 10
JETFED = [sys.executable, "-m", "jetfed.cli"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_serving(address: str, process: subprocess.Popen, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise SystemExit(f"a service at {address} exited with {process.returncode}")
            try:
                stub.Check(health_pb2.HealthCheckRequest(), timeout=2.0, wait_for_ready=True)
                return
            except grpc.RpcError:
                time.sleep(0.2)
    raise SystemExit(f"{address} did not serve within {timeout:.0f}s")


def run_split(data_dir: Path, split: str, alpha: float, rounds: int, seed: int, out: Path) -> Dict[str, object]:
    """One federation of SHARDS workers over `split` ("iid" or "dirichlet")."""
    processes: List[subprocess.Popen] = []
    logs = out / "logs"
    logs.mkdir(parents=True)
    try:
        common = ["--data-dir", str(data_dir), "--no-download", "--threads", "1", "--host", "127.0.0.1"]
        workers: Dict[str, str] = {}
        for index in range(1, SHARDS + 1):
            name, port = f"w{index:02d}", free_port()
            partition = ["--shard", f"{index}/{SHARDS}"] + (["--dirichlet", str(alpha)] if split == "dirichlet" else [])
            with (logs / f"{name}.log").open("wb") as log:
                processes.append(subprocess.Popen(
                    [*JETFED, "worker", "--name", name, "--port", str(port), *partition, *common],
                    stdout=log, stderr=subprocess.STDOUT))
            workers[name] = f"127.0.0.1:{port}"
        evaluator_port = free_port()
        with (logs / "evaluator.log").open("wb") as log:
            processes.append(subprocess.Popen(
                [*JETFED, "evaluator", "--port", str(evaluator_port), *common[:-2], "--threads", "2"],
                stdout=log, stderr=subprocess.STDOUT))
        for process, address in zip(processes, [*workers.values(), f"127.0.0.1:{evaluator_port}"]):
            wait_serving(address, process)
        started = time.perf_counter()
        coordinator = [*JETFED, "coordinator", "--rounds", str(rounds), "--seed", str(seed), "--out", str(out / "run"),
                       "--evaluator", f"127.0.0.1:{evaluator_port}", "--eval-every", "10"]
        for name, address in workers.items():
            coordinator += ["--worker", f"{name}={address}"]
        with (logs / "coordinator.log").open("wb") as log:
            code = subprocess.run(coordinator, stdout=log, stderr=subprocess.STDOUT).returncode
        seconds = time.perf_counter() - started
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(timeout=30)
    if code:
        raise SystemExit(f"the coordinator exited with {code}; see {logs / 'coordinator.log'}")
    records = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    accuracy = {r["round"]: r["evaluation"]["global"]["accuracy"] for r in records if "evaluation" in r}
    examples = {name: info["num_examples"] for name, info in records[-1]["updates"].items()}
    return {"split": split, "alpha": alpha if split == "dirichlet" else None, "shards": SHARDS, "rounds": rounds,
            "seed": seed, "global_accuracy": accuracy, "seconds": round(seconds, 1),
            "last_round_examples": examples}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--split", choices=["iid", "dirichlet", "both"], default="both")
    args = parser.parse_args()
    splits = ["iid", "dirichlet"] if args.split == "both" else [args.split]
    with tempfile.TemporaryDirectory(prefix="jetfed-shards-") as scratch:
        for split in splits:
            result = run_split(args.data_dir.resolve(), split, args.alpha, args.rounds, args.seed, Path(scratch) / split)
            print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
