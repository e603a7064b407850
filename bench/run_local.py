"""`make run-local`, timed from the outside: the command's wall time to exit, split into
start-up to SERVING, the coordinator's start, the rounds' training, the evaluation the
run waited for at its end and the tail (stopping every service), with each service's
peak RSS (VmHWM, sampled while it runs). The issue's goals: command to exit <= 25 s on
a 2-core machine with the reference's accuracy, a worker's RSS <= 600 MB on x86.

Runs tools/run_local.py (what `make run-local` runs) in a fresh folder, reads its
output lines as they come (each stamped with the seconds since the command started),
its metrics.jsonl and the coordinator's summary, and prints one JSON object. The
machine's load average is printed beside it: on a shared machine, compare runs taken
under the same load. Not a test: timings are goals here, never assertions.

    .venv/bin/python bench/run_local.py --data-dir ../shared/datasets/mnist [--rounds 40]
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
from typing import Dict, List, Optional, Tuple

ROOT = Path(__file__).resolve().parent.parent
LAUNCHER = ROOT / "tools" / "run_local.py"
SERVICES = ("alice", "bob", "charlie", "testing")


def descendants(pid: int) -> List[int]:
    """Every process below `pid` (Linux /proc), found by their parent ids."""
    parents: Dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    parents[int(entry)] = int(stat.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        children = [child for child, of in parents.items() if of == parent]
        found += children
        frontier += children
    return found


def service_of(pid: int) -> Optional[str]:
    """`alice`, ..., `testing` or `coordinator` from a jetfed process's command line."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            words = handle.read().decode(errors="replace").split("\0")
    except OSError:
        return None
    if "coordinator" in words:
        return "coordinator"
    if "--name" in words and words.index("--name") + 1 < len(words):
        return words[words.index("--name") + 1]
    return None


def peak_rss_mb(pid: int) -> Optional[float]:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


class RssSampler(threading.Thread):
    """Each service's peak RSS, read from /proc every 0.2 s while the launcher runs."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.peaks: Dict[str, float] = {}
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.2):
            for child in descendants(self.pid):
                name, rss = service_of(child), peak_rss_mb(child)
                if name and rss:
                    self.peaks[name] = max(self.peaks.get(name, 0.0), rss)


def run(data_dir: Path, rounds: Optional[int], out: Path, launcher_flags: List[str],
        ) -> Tuple[List[Tuple[float, str]], int, float, Dict[str, float]]:
    argv = [sys.executable, str(LAUNCHER), "--data-dir", str(data_dir), "--out", str(out), *launcher_flags]
    if rounds:
        argv += ["--rounds", str(rounds)]
    started = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    sampler = RssSampler(proc.pid)
    sampler.start()
    lines = []
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append((time.perf_counter() - started, line.rstrip("\n")))
    code = proc.wait()
    total = time.perf_counter() - started
    sampler.done.set()
    sampler.join()
    return lines, code, total, sampler.peaks


def first(lines: List[Tuple[float, str]], pattern: str) -> Tuple[Optional[float], Optional["re.Match[str]"]]:
    for seconds, line in lines:
        match = re.search(pattern, line)
        if match:
            return seconds, match
    return None, None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--rounds", type=int, help="default: the config's (40)")
    parser.add_argument("--eval-threads", type=int, help="the evaluator's torch threads (default: the launcher's)")
    parser.add_argument("--device", help="the services' --device (default: theirs, CUDA when available)")
    parser.add_argument("--threads", type=int, help="each worker's torch threads (default: the launcher's, 1)")
    parser.add_argument("--model", help="the task's model (default: the config's, mnist-cnn)")
    args = parser.parse_args()
    flags = ["--eval-threads", str(args.eval_threads)] if args.eval_threads else []
    flags += ["--device", args.device] if args.device else []
    flags += ["--threads", str(args.threads)] if args.threads else []
    flags += ["--model", args.model] if args.model else []
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="jetfed-run-local-") as scratch:
        out = Path(scratch) / "run"
        lines, code, total, peaks = run(args.data_dir.resolve(), args.rounds, out, flags)
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()] \
            if (out / "metrics.jsonl").exists() else []
    if code != 0:
        print("\n".join(line for _, line in lines[-30:]), file=sys.stderr)
        sys.exit(f"run-local exited with status {code}")
    serving, _ = first(lines, r"services SERVING after")
    waiting, _ = first(lines, r"^Waiting up to")
    first_round, _ = first(lines, r"^Training round 1/")
    finished, summary = first(lines, r"^Run finished: .* \(training ([\d.]+)s .*evaluation ([\d.]+)s\)")
    final = records[-1].get("evaluation", {}).get("global", {}) if records else {}
    evaluations = [r["eval_s"] for r in records if "eval_s" in r]
    print(json.dumps({
        "bench": "run_local",
        "load_average": [round(x, 2) for x in load_before],
        "cpus": os.cpu_count(),
        "rounds": len(records),
        "launcher_flags": flags,
        "command_to_exit_s": round(total, 2),
        # Launcher start (imports, checks) and the services' own start, to every one SERVING.
        "start_to_serving_s": serving and round(serving, 2),
        # The coordinator process's start (imports, settings) until it addresses the fleet.
        "coordinator_start_s": serving and waiting and round(waiting - serving, 2),
        "connect_s": waiting and first_round and round(first_round - waiting, 2),
        "training_s": summary and float(summary.group(1)),
        # What the run waited for after its last round: the last evaluation, scored alone.
        "evaluation_tail_s": summary and float(summary.group(2)),
        "evaluations": len(evaluations),
        "evaluation_each_s": [round(s, 2) for s in evaluations],
        "stop_tail_s": finished and round(total - finished, 2),
        "accuracy": final.get("accuracy"),
        # Where the workers trained (their reported device) and their mean compute a round.
        "worker_devices": sorted({u.get("device", "?") for r in records for u in r.get("updates", {}).values()}),
        "worker_train_s_mean": round(sum(train) / len(train), 4) if (train := [
            u["train_seconds"] for r in records for u in r.get("updates", {}).values() if "train_seconds" in u]) else None,
        "peak_rss_mb": {name: round(mb) for name, mb in sorted(peaks.items())},
    }))


if __name__ == "__main__":
    main()
