"""One coordinator, many workers, real gRPC on loopback: the real `jetfed coordinator`
process (fedavg, no evaluator, a generated federation.toml) drives N zero-compute
workers of the harness (bench/fleet.py: real WorkerService servicers, one grpc.aio
server and port each, many per process), so the figures are the coordinator's own
per-round overhead and memory.

For each N it prints one JSON line, then a markdown table of them all:
- round_s: mean duration_s of rounds 2..R in metrics.jsonl (round 1 apart, as round1_s);
- cpu_s_per_round: the coordinator's user+system CPU seconds per round (rounds 2..R,
  /proc/PID/stat sampled at each "Training round k/R" line and at the end), and the
  harness processes' beside it (they share the same cores);
- peak_rss_mib: the coordinator's VmHWM; idle_rss_mib its RSS when it prints
  "Training round 1/R" (connected, holding the initial model, no Train yet);
  above_idle_models: (peak - idle) in units of one model's bytes.

    .venv/bin/python bench/fleet_scale.py [--workers 10,100,300,1000] [--rounds 3]
    .venv/bin/python bench/fleet_scale.py --model resnet18 --workers 3,10,30
    ... --profile DIR  also writes the coordinator's cProfile stats (coordinator-N.prof)

--max-rss-mib stops a coordinator that grows past it (the machine is shared), and the
line then says so.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.fleet import HarnessFleet, write_init_weights  # noqa: E402

TICK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
ROUND_LINE = re.compile(r"Training round (\d+)/(\d+)")
WORKERS_PER_PROCESS = 250
MAX_HARNESS_PROCESSES = 4


def cpu_seconds(pid: int) -> float:
    """utime + stime of `pid` from /proc (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK  # fields 14 and 15 of stat(5)


def memory_mib(pid: int) -> Dict[str, float]:
    """VmRSS and VmHWM of `pid` in MiB ({} once it is gone)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    return {key: int(value.split()[0]) / 1024 for key, value in
            (line.split(":", 1) for line in text.splitlines() if line.startswith(("VmRSS", "VmHWM")))}


class Sampler(threading.Thread):
    """Samples the coordinator's memory every `period` s (VmHWM is the true peak; the
    samples are there to stop a run past --max-rss-mib)."""

    def __init__(self, pid: int, limit_mib: float, period: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.pid, self.limit, self.period = pid, limit_mib, period
        self.peak = 0.0
        self.hwm = 0.0
        self.over = False
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            memory = memory_mib(self.pid)
            if not memory:
                return
            self.peak = max(self.peak, memory.get("VmRSS", 0.0))
            self.hwm = max(self.hwm, memory.get("VmHWM", 0.0))
            if self.peak > self.limit:
                self.over = True
                os.kill(self.pid, 9)
                return
            time.sleep(self.period)


def git_commit() -> str:
    """HEAD of the tree measured (+dirty with uncommitted changes to tracked files), or
    $JETFED_BENCH_COMMIT for a tree exported without its .git (git archive)."""
    if os.environ.get("JETFED_BENCH_COMMIT"):
        return os.environ["JETFED_BENCH_COMMIT"]
    done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                           text=True)
    return (done.stdout.strip() or "unknown") + ("+dirty" if dirty.stdout.strip() else "")


def run_one(workers: int, args: argparse.Namespace, out: Path) -> Dict[str, Any]:
    init = out / "init.safetensors"
    model_bytes = write_init_weights(init, args.model)
    processes = min(MAX_HARNESS_PROCESSES, -(-workers // WORKERS_PER_PROCESS))
    load_before = os.getloadavg()[0]
    with HarnessFleet(workers, processes=processes, model=args.model, log_dir=out) as fleet:
        config = fleet.federation_toml(out / "federation.toml", rounds=args.rounds, init_weights=init,
                                       strategy=args.strategy)
        command = [sys.executable]
        if args.profile:
            args.profile.mkdir(parents=True, exist_ok=True)
            command += ["-m", "cProfile", "-o", str(args.profile / f"coordinator-{args.model}-{workers}.prof")]
        command += ["-m", "jetfed.cli", "coordinator", "--config", str(config), "--out", str(out / "run"),
                    "--log-level", args.log_level, *args.coordinator_arg]
        with open(out / "coordinator.log", "wb") as log:
            coordinator = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=log, text=True,
                                           env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)})
        sampler = Sampler(coordinator.pid, args.max_rss_mib)
        sampler.start()
        marks: Dict[int, Dict[str, float]] = {}
        lines: List[str] = []
        assert coordinator.stdout is not None
        for line in coordinator.stdout:
            lines.append(line.rstrip())
            found = ROUND_LINE.search(line)
            if found or line.startswith("Run finished"):
                key = int(found.group(1)) if found else args.rounds + 1
                marks[key] = {"t": time.perf_counter(), "cpu": cpu_seconds(coordinator.pid),
                              "rss": memory_mib(coordinator.pid).get("VmRSS", 0.0),
                              "harness_cpu": sum(cpu_seconds(pid) for pid in fleet.pids)}
        memory = memory_mib(coordinator.pid)  # a zombie until reaped: its peak is still there
        _, status, usage = os.wait4(coordinator.pid, 0)
        coordinator.returncode = os.waitstatus_to_exitcode(status)
        sampler.done.set()
        sampler.join()
    load_after = os.getloadavg()[0]
    result: Dict[str, Any] = {
        "bench": "fleet_scale", "commit": git_commit(), "model": args.model, "model_bytes": model_bytes,
        "workers": workers, "harness_processes": processes, "rounds": args.rounds, "strategy": args.strategy,
        "coordinator_args": args.coordinator_arg,
        "load_1min": [round(load_before, 1), round(load_after, 1)], "fleet_start_s": round(fleet.start_seconds, 1),
    }
    if coordinator.returncode != 0 or sampler.over:
        why = f"over --max-rss-mib {args.max_rss_mib:.0f}" if sampler.over else f"exit {coordinator.returncode}"
        tail = (out / "coordinator.log").read_text(errors="replace")[-2000:]
        return {**result, "failed": why, "peak_rss_mib": round(max(sampler.peak, memory.get("VmHWM", 0.0))),
                "stdout_tail": lines[-5:], "log_tail": tail}
    records = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    steady = records[1:] or records
    rounds = range(2, args.rounds + 1) if args.rounds > 1 else range(1, 2)
    cpu = [marks[k + 1]["cpu"] - marks[k]["cpu"] for k in rounds if k in marks and k + 1 in marks]
    harness = [marks[k + 1]["harness_cpu"] - marks[k]["harness_cpu"] for k in rounds if k in marks and k + 1 in marks]
    cycle = [marks[k + 1]["t"] - marks[k]["t"] for k in rounds if k in marks and k + 1 in marks]
    peak = max(memory.get("VmHWM", 0.0), usage.ru_maxrss / 1024, sampler.hwm)
    idle = marks.get(1, {}).get("rss", 0.0)
    ready = re.search(r"fleet was ready in ([\d.]+)s", "\n".join(lines))
    mean = lambda values: round(sum(values) / len(values), 3) if values else None  # noqa: E731
    return {
        **result,
        "connect_s": float(ready.group(1)) if ready else None,
        "round1_s": round(records[0]["duration_s"], 3),
        "round_s": mean([r["duration_s"] for r in steady]),
        "round_s_max": round(max(r["duration_s"] for r in steady), 3),
        "cycle_s": mean(cycle),  # round start to next round start: the round, its checkpoint and metrics line
        "cpu_s_per_round": mean(cpu),
        "cpu_share": round(sum(cpu) / sum(cycle), 2) if cycle else None,  # of one core
        "harness_cpu_s_per_round": mean(harness),
        "cpu_s_total": round(usage.ru_utime + usage.ru_stime, 2),
        "idle_rss_mib": round(idle, 1),
        "peak_rss_mib": round(peak, 1),
        "above_idle_mib": round(peak - idle, 1),
        "above_idle_models": round((peak - idle) * (1 << 20) / model_bytes, 2),
        "rss_at_round_start_mib": [round(marks[k]["rss"]) for k in sorted(marks)],  # the last: at the end
        "updates": [len(r.get("updates", r.get("workers", []))) for r in records],
        "attempts": [r.get("attempts", 1) for r in records],
    }


def table(results: List[Dict[str, Any]]) -> str:
    head = ("| model | N | coordinator flags | round 1 s | round s (2..R) | coordinator CPU s/round "
            "| harness CPU s/round | idle RSS MiB | peak RSS MiB | peak - idle MiB (models) | load |")
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        first = f"| {r['model']} | {r['workers']} | {' '.join(r.get('coordinator_args', [])) or '-'} "
        if "failed" in r:
            rows.append(first + f"| failed: {r['failed']} | | | | | {r['peak_rss_mib']} | | {r['load_1min']} |")
            continue
        rows.append(
            first + f"| {r['round1_s']:.2f} | {r['round_s']:.2f} | {r['cpu_s_per_round']} "
            f"| {r['harness_cpu_s_per_round']} | {r['idle_rss_mib']:.0f} | {r['peak_rss_mib']:.0f} "
            f"| {r['above_idle_mib']:.0f} ({r['above_idle_models']}) | {r['load_1min'][0]}-{r['load_1min'][1]} |"
        )
    return "\n".join(rows)


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", default=None,
                        help="comma-separated N (default 10,100,300,1000; resnet18: 3,10,30)")
    parser.add_argument("--model", default="mnist-cnn", choices=["mnist-cnn", "resnet18"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--strategy", default="fedavg")
    parser.add_argument("--max-rss-mib", type=float, default=8192.0)
    parser.add_argument("--log-level", default="INFO", help="the coordinator's, as a deployment runs it")
    parser.add_argument("--coordinator-arg", action="append", default=[], metavar="FLAG",
                        help="a flag for the coordinator, repeatable, e.g. --coordinator-arg=--max-concurrency=16")
    parser.add_argument("--profile", type=Path, metavar="DIR")
    parser.add_argument("--keep", type=Path, metavar="DIR", help="keep each run's folder here (default: a temp dir)")
    args = parser.parse_args(argv)
    default = "3,10,30" if args.model == "resnet18" else "10,100,300,1000"
    sizes = [int(n) for n in (args.workers or default).split(",")]
    results = []
    for workers in sizes:
        if args.keep:
            out = args.keep / f"{args.model}-{workers}"
            out.mkdir(parents=True, exist_ok=True)
            result = run_one(workers, args, out)
        else:
            with tempfile.TemporaryDirectory(prefix="jetfed-fleet-") as folder:
                result = run_one(workers, args, Path(folder))
        print(json.dumps(result), flush=True)
        results.append(result)
    print(table(results), flush=True)


if __name__ == "__main__":
    main()
