"""image-folder against the mnist task on the same pixels, and a worker's memory on a
folder of 60,000 PNGs. Real processes throughout, as `make run-local` starts them.

    python bench/image_folder.py accuracy --data-dir MNIST_DIR [--rounds 40] [--loader-workers 0]
    python bench/image_folder.py memory --data-dir MNIST_DIR [--loader-workers 0]

accuracy: tools/mnist_to_imagefolder.py writes the MNIST files out as PNG folders
(alice 0-3, bob 4-6, charlie 7-9, the evaluator's test set), then the reference
federation (examples/federation.toml: mnist-cnn, seed 1, 40 rounds) runs twice over
the same launcher: the mnist task on the IDX files, and image-folder on the PNGs. The
goal: round-40 accuracy within 0.5 point (with the same order it should be the same).

memory: the whole training set as one board (`--boards all=all`), one worker process
training full epochs (--batches 0) for a few rounds; its VmRSS is sampled from
/proc/<pid>/status every 0.2 s, its VmHWM read at the end, and the DataLoader
processes (children of the forkserver, itself the worker's child) are counted apart.
The goal: the worker under 1 GB.

The PNG folders are kept in --folders (default: a scratch folder under /tmp) and are
only written once: the tool skips files that are there.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "examples" / "federation.toml"
BOARDS = {"alice": "0-3", "bob": "4-6", "charlie": "7-9"}
HOST = "127.0.0.1"
AS_MNIST = ["--model", "mnist-cnn", "--option", "image_size=28", "--option", "channels=1", "--option", "mean=0.1307",
            "--option", "std=0.3081", "--option", "classes=" + ",".join(str(d) for d in range(10))]


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def jetfed(*args: str) -> List[str]:
    return [sys.executable, "-m", "jetfed.cli", *args]


def write_folders(data_dir: Path, out: Path, *boards: str) -> float:
    started = time.perf_counter()
    argv = [sys.executable, str(ROOT / "tools" / "mnist_to_imagefolder.py"), "--data-dir", str(data_dir),
            "--out", str(out)]
    if boards:
        argv += ["--boards", *boards, "--evaluator", "none"]
    subprocess.run(argv, check=True)
    return time.perf_counter() - started


class Services:
    """Processes started here, stopped with SIGTERM on the way out, whatever happens."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.started: Dict[str, subprocess.Popen] = {}

    def start(self, name: str, argv: List[str]) -> str:
        port = free_port()
        with (self.logs / f"{name}.log").open("wb") as log:
            self.started[name] = subprocess.Popen([*argv, "--host", HOST, "--port", str(port)], stdout=log,
                                                  stderr=subprocess.STDOUT)
        return f"{HOST}:{port}"

    def wait_serving(self, addresses: Dict[str, str], timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        for name, address in addresses.items():
            with grpc.insecure_channel(address) as channel:
                stub = health_pb2_grpc.HealthStub(channel)
                while True:
                    if self.started[name].poll() is not None or time.monotonic() > deadline:
                        raise SystemExit(f"{name} did not start; see {self.logs / (name + '.log')}")
                    try:
                        stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0, wait_for_ready=True)
                        break
                    except grpc.RpcError:
                        continue

    def stop(self) -> None:
        for popen in self.started.values():
            if popen.poll() is None:
                popen.send_signal(signal.SIGTERM)
        for popen in self.started.values():
            try:
                popen.wait(30)
            except subprocess.TimeoutExpired:
                popen.kill()


def run_logged(argv: List[str], log: Path) -> None:
    """Run the coordinator; a failure ends the bench with its last lines (the scratch
    folder and its logs go with it)."""
    with log.open("wb") as handle:
        code = subprocess.run(argv, stdout=handle, stderr=subprocess.STDOUT).returncode
    if code != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
        raise SystemExit(f"coordinator exited {code}; its last lines:\n{tail}")


def federation(workers: Dict[str, List[str]], evaluator: List[str], rounds: int, out: Path,
               task: str = "mnist") -> dict:
    """The reference federation (run-local's config and threads) with each service's
    own data and task flags (`task` is what the coordinator requires of them); the
    figures come from the run's metrics.jsonl."""
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    services = Services(logs)
    started = time.perf_counter()
    try:
        addresses = {name: services.start(name, jetfed("worker", "--name", name, "--no-download", "--threads", "1",
                                                       *flags))
                     for name, flags in workers.items()}
        addresses["testing"] = services.start("testing", jetfed("evaluator", "--name", "testing", "--no-download",
                                                                "--threads", str(os.cpu_count() or 1), *evaluator))
        services.wait_serving(addresses)
        ready = time.perf_counter() - started
        argv = jetfed("coordinator", "--config", str(CONFIG), "--task", task, "--out", str(out),
                      "--rounds", str(rounds),
                      "--evaluator", f"testing={addresses.pop('testing')}", "--status-address",
                      f"{HOST}:{free_port()}", *[f"--worker={name}={address}" for name, address in addresses.items()])
        run_logged(argv, logs / "coordinator.log")
    finally:
        services.stop()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {
        "accuracy": records[-1]["evaluation"]["global"]["accuracy"],
        "rounds": len(records),
        "startup_s": round(ready, 1),
        "round_s": round(sum(r["duration_s"] for r in records) / len(records), 3),
        "train_s": round(sum(r["train_s"] for r in records), 1),
        "eval_s": round(sum(r.get("eval_s", 0.0) for r in records), 1),
        "wall_s": round(time.perf_counter() - started, 1),
    }


def accuracy(args: argparse.Namespace, scratch: Path) -> None:
    folders = args.folders or scratch / "folders"
    write_s = write_folders(args.data_dir, folders)
    results = {}
    if not args.skip_mnist:
        mnist = ["--data-dir", str(args.data_dir), "--model", "mnist-cnn"]
        results["mnist"] = federation({name: [*mnist, "--labels", labels] for name, labels in BOARDS.items()},
                                      mnist, args.rounds, scratch / "mnist")
    task = ["--task", "image-folder", *AS_MNIST, "--option", f"loader_workers={args.loader_workers}"]
    results["image-folder"] = federation(
        {name: ["--data-dir", str(folders / name), *task] for name in BOARDS},
        ["--data-dir", str(folders / "evaluator"), *task], args.rounds, scratch / "image-folder", task="image-folder")
    summary = {"bench": "image_folder.accuracy", "rounds": args.rounds, "loader_workers": args.loader_workers,
               "folders_write_s": round(write_s, 1), **results}
    if "mnist" in results:
        summary["difference_points"] = round(
            100 * (results["image-folder"]["accuracy"] - results["mnist"]["accuracy"]), 2)
    print(json.dumps(summary), flush=True)


def descendants(pid: int) -> List[int]:
    """Every process below `pid` (the forkserver and the DataLoader processes it forks)."""
    found, queue = [], [pid]
    while queue:
        parent = queue.pop()
        for task in Path(f"/proc/{parent}/task").glob("*/children"):
            try:
                children = [int(c) for c in task.read_text().split()]
            except OSError:
                continue
            found += children
            queue += children
    return found


def proc_kb(pid: int, field: str, file: str = "status") -> int:
    """A field of /proc/<pid>/status (VmRSS, VmHWM) or smaps_rollup (Pss), in kB; 0 once gone."""
    try:
        for line in Path(f"/proc/{pid}/{file}").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class RssSampler(threading.Thread):
    """Peak VmRSS and PSS of a process, and of its descendants (each, and summed),
    every `interval` s. RSS counts shared library pages in every process that maps
    them; PSS splits them, so the sum of PSS is what the board really gives."""

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak_kb = self.peak_pss_kb = 0
        self.children_peak_kb: Dict[int, int] = {}
        self.children_rss_sum_kb = self.children_pss_sum_kb = 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(self.interval):
            self.peak_kb = max(self.peak_kb, proc_kb(self.pid, "VmRSS"))
            self.peak_pss_kb = max(self.peak_pss_kb, proc_kb(self.pid, "Pss", "smaps_rollup"))
            rss_sum = pss_sum = 0
            for child in descendants(self.pid):
                rss = proc_kb(child, "VmRSS")
                rss_sum += rss
                pss_sum += proc_kb(child, "Pss", "smaps_rollup")
                self.children_peak_kb[child] = max(self.children_peak_kb.get(child, 0), rss)
            self.children_rss_sum_kb = max(self.children_rss_sum_kb, rss_sum)
            self.children_pss_sum_kb = max(self.children_pss_sum_kb, pss_sum)


def memory(args: argparse.Namespace, scratch: Path) -> None:
    folders = args.folders or scratch / "folders-all"
    write_s = write_folders(args.data_dir, folders, "all=all")
    logs = scratch / "memory-logs"
    logs.mkdir(parents=True, exist_ok=True)
    services = Services(logs)
    try:
        address = services.start("all", jetfed(
            "worker", "--name", "all", "--data-dir", str(folders / "all"), "--no-download", "--threads",
            str(args.threads), "--task", "image-folder", *AS_MNIST, "--option", f"loader_workers={args.loader_workers}"))
        pid = services.started["all"].pid
        sampler = RssSampler(pid)
        sampler.start()
        services.wait_serving({"all": address})
        serving_kb = proc_kb(pid, "VmRSS")
        started = time.perf_counter()
        argv = jetfed("coordinator", "--task", "image-folder", "--worker", f"all={address}",
                      "--out", str(scratch / "memory-run"),
                      "--rounds", str(args.rounds), "--batches", "0", "--round-timeout", "1800", "--seed", "1")
        run_logged(argv, logs / "coordinator.log")
        rounds_s = time.perf_counter() - started
        sampler.done.set()
        sampler.join()
        children = {child: proc_kb(child, "VmHWM") for child in descendants(pid)}
        hwm_kb = proc_kb(pid, "VmHWM")
    finally:
        services.stop()
    records = [json.loads(line) for line in (scratch / "memory-run" / "metrics.jsonl").read_text().splitlines()]
    mib = 1024
    print(json.dumps({
        "bench": "image_folder.memory", "images": sum(1 for _ in (folders / "all").rglob("*.png")),
        "loader_workers": args.loader_workers, "threads": args.threads, "rounds": len(records),
        "examples_per_round": records[-1]["updates"]["all"]["num_examples"] if "updates" in records[-1] else None,
        "rounds_s": round(rounds_s, 1), "folders_write_s": round(write_s, 1),
        "worker_rss_serving_mib": round(serving_kb / mib), "worker_rss_peak_sampled_mib": round(sampler.peak_kb / mib),
        "worker_vmhwm_mib": round(hwm_kb / mib), "worker_pss_peak_sampled_mib": round(sampler.peak_pss_kb / mib),
        "children_vmhwm_mib": {str(pid): round(kb / mib) for pid, kb in children.items()},
        "children_rss_sum_peak_sampled_mib": round(sampler.children_rss_sum_kb / mib),
        "children_pss_sum_peak_sampled_mib": round(sampler.children_pss_sum_kb / mib),
    }), flush=True)


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["accuracy", "memory"])
    parser.add_argument("--data-dir", type=Path, required=True, help="the MNIST IDX files")
    parser.add_argument("--folders", type=Path, help="where the PNG folders are kept (default: scratch)")
    parser.add_argument("--rounds", type=int, help="accuracy: 40 (the reference); memory: 3 full epochs")
    parser.add_argument("--loader-workers", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="memory: the worker's torch threads")
    parser.add_argument("--skip-mnist", action="store_true", help="accuracy: run image-folder only")
    args = parser.parse_args(argv)
    args.rounds = args.rounds or (40 if args.what == "accuracy" else 3)
    with tempfile.TemporaryDirectory(prefix="jetfed-bench-") as scratch:
        (accuracy if args.what == "accuracy" else memory)(args, Path(scratch))


if __name__ == "__main__":
    main()
