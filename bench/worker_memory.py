"""A worker's memory, phase by phase: where its RSS above `import torch` goes.

Starts a real worker process the way `make run-local` starts alice (jetfed worker with
the reference config's flags: mnist, mnist-cnn, labels 0-3, one torch thread), then
plays the coordinator over real gRPC: the initial weights of seed 1 (InitialWeights),
then --rounds Train calls with the reference recipe (SGD lr 0.1, 10 batches of 32).

With --phases (the default) the worker process runs under a probe (this file,
`--child`) that wraps the worker's own functions and prints, for each phase, the RSS
at its start and end and the peak within it: the peak counter (VmHWM) is reset at each
phase's start (/proc/self/clear_refs 5, Linux >= 4.0), so a phase's peak is its own.
Phases: python (the interpreter), torch (`import torch`), imports (the rest of the
worker's modules), task, data (the partition's load), service (the model and the
servicer), warm-up, serve (the gRPC server up), then per call: initial-weights and,
per round, receive, decode, train, encode, send. `--plain` runs the worker unprobed
and reports only its VmHWM and VmRSS after the rounds: the figure bench/run_local.py
samples.

Prints a table and one JSON line (with the worker's malloc arenas besides the main
one, and its mean train seconds). MALLOC_ARENA_MAX=64 in the environment runs the
worker as before jetfed.allocator (glibc's default arenas), for an A/B. Not a test:
the goal (<= 600 MB on x86) is a goal.

    .venv/bin/python bench/worker_memory.py --data-dir ../shared/datasets/mnist [--rounds 5] [--plain]
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from jetfed import allocator  # noqa: E402  (light: no torch)
PROBE = "JETFED_PROBE "


def _status() -> Dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile of this process, in KiB."""
    values = {}
    with open("/proc/self/status") as status:
        for line in status:
            key = line.split(":", 1)[0]
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                values[key] = int(line.split()[1])
    return values


class Probe:
    """The child's phase clock: `begin` resets the peak counter, `end` prints the phase."""

    def __init__(self) -> None:
        self.overall = 0  # the process's peak over every phase (resets fold it in first)
        self.started: Dict[str, Dict[str, int]] = {}

    def _reset(self) -> Dict[str, int]:
        now = _status()
        self.overall = max(self.overall, now["VmHWM"])
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return now

    def begin(self, phase: str) -> None:
        self.started[phase] = self._reset()

    def end(self, phase: str) -> None:
        start = self.started.pop(phase)
        now = _status()
        self.overall = max(self.overall, now["VmHWM"])
        record = {"phase": phase, "start": start["VmRSS"], "end": now["VmRSS"], "peak": now["VmHWM"],
                  "anon": now["RssAnon"], "file": now["RssFile"], "overall": self.overall}
        print(PROBE + json.dumps(record), file=sys.stderr, flush=True)
        self._reset()


def _wrap(probe: Probe, owner: Any, name: str, phase: str) -> None:
    original = getattr(owner, name)

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        probe.begin(phase)
        try:
            return original(*args, **kwargs)
        finally:
            probe.end(phase)

    setattr(owner, name, wrapped)


def _wrap_async(probe: Probe, owner: Any, name: str, phase: str) -> None:
    original = getattr(owner, name)

    async def wrapped(*args: Any, **kwargs: Any) -> Any:
        probe.begin(phase)
        try:
            return await original(*args, **kwargs)
        finally:
            probe.end(phase)

    setattr(owner, name, wrapped)


def child(argv: List[str]) -> int:
    """The worker, probed: `jetfed worker ARGV` with each phase's RSS on stderr."""
    probe = Probe()
    probe.begin("python")
    probe.end("python")
    probe.begin("torch")
    importlib.import_module("torch")
    probe.end("torch")
    probe.begin("imports")
    import worker.cli as cli
    import worker.service as service
    from jetfed import codec, wire
    probe.end("imports")

    make_task = cli.task_from_args

    def task_from_args(*args: Any, **kwargs: Any) -> Any:
        probe.begin("task")
        task = make_task(*args, **kwargs)
        probe.end("task")
        _wrap(probe, task, "load", "data")
        return task

    cli.task_from_args = task_from_args
    _wrap(probe, service.WorkerService, "__init__", "service")
    _wrap(probe, service.WorkerService, "warm_up", "warm-up")
    _wrap(probe, service.WorkerService, "_initial_weights", "initial-weights")
    _wrap(probe, service.WorkerService, "_train", "train")
    _wrap(probe, service.WorkerService, "_encoded_result", "encode")
    _wrap(probe, codec, "decode_finite", "decode")
    _wrap_async(probe, wire, "read_weight_stream", "receive")
    sending = service.WorkerService._result_messages

    def result_messages(*args: Any, **kwargs: Any) -> Any:
        probe.begin("send")
        yield from sending(*args, **kwargs)
        probe.end("send")

    service.WorkerService._result_messages = result_messages
    start_serving = cli.host_until_signal

    async def host_until_signal(*args: Any, **kwargs: Any) -> Any:
        probe.begin("serve")
        return await start_serving(*args, **kwargs)

    cli.host_until_signal = host_until_signal
    report = service.WorkerService.report_health_through

    def serving(self: Any, running: Any) -> None:
        report(self, running)
        probe.end("serve")

    service.WorkerService.report_health_through = serving
    return cli.main(argv)


def worker_argv(port: int, data_dir: Path) -> List[str]:
    """What tools/run_local.py starts alice with (examples/federation.toml)."""
    return ["--name", "alice", "--host", "127.0.0.1", "--port", str(port), "--threads", "1", "--task", "mnist",
            "--model", "mnist-cnn", "--data-dir", str(data_dir), "--labels", "0-3", "--partition-seed", "0",
            "--no-download", "--device", "cpu"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def status_of(pid: int) -> Dict[str, int]:
    values = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            key = line.split(":", 1)[0]
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(line.split()[1])
    return values


async def play_coordinator(address: str, rounds: int) -> Tuple[List[float], List[float]]:
    """InitialWeights for seed 1, then `rounds` Trains of the reference recipe; their
    losses and the worker's train seconds."""
    from coordinator.clients import Weights, WorkerClient
    from jetfed import stream
    from jetfed.config import TrainConfig

    client = WorkerClient("alice", address, stream.DEFAULT_CHUNK_BYTES)
    try:
        info = await client.info(120)
        weights = await client.initial_weights(1, info.model, info.model_digest, 64 << 20, 60)
        client.expect(info.model, weights.manifest.tensors, stream.payload_limit(weights.manifest.total_bytes))
        losses, seconds = [], []
        for number in range(1, rounds + 1):
            config = TrainConfig(lr=max(0.1 * 0.98 ** (number - 1), 0.001), seed=1)
            update = await client.train(number, config, weights, 120)
            losses.append(update.mean_loss)
            seconds.append(update.train_seconds)
            weights = Weights.of(update.weights.state, info.model)
        return losses, seconds
    finally:
        await client.close()


def run(data_dir: Path, rounds: int, plain: bool) -> Dict[str, Any]:
    port = free_port()
    if plain:
        command = [sys.executable, "-m", "jetfed.cli", "worker", *worker_argv(port, data_dir)]
    else:
        command = [sys.executable, __file__, "--child", *worker_argv(port, data_dir)]
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    phases: List[Dict[str, Any]] = []
    lines: List[str] = []

    def read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            if line.startswith(PROBE):
                phases.append(json.loads(line[len(PROBE):]))
            else:
                lines.append(line.rstrip("\n"))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        losses, seconds = asyncio.run(play_coordinator(f"127.0.0.1:{port}", rounds))
        time.sleep(0.2)
        final = status_of(proc.pid)
        arenas = allocator.extra_arenas(proc.pid)
    except BaseException:
        proc.terminate()
        proc.wait(10)
        reader.join(5)
        print("\n".join(lines[-30:]), file=sys.stderr)
        raise
    proc.terminate()
    proc.wait(30)
    reader.join(5)
    return {"bench": "worker_memory", "mode": "plain" if plain else "phases", "rounds": rounds,
            "peak_mb": round(final["VmHWM"] / 1024, 1) if plain else
            round(max(p["overall"] for p in phases) / 1024, 1),
            "rss_after_mb": round(final["VmRSS"] / 1024, 1), "extra_malloc_arenas": arenas,
            "train_s_mean": round(sum(seconds) / len(seconds), 4) if seconds else None,
            "losses": [round(loss, 4) for loss in losses], "phases": phases}


def table(phases: List[Dict[str, Any]]) -> str:
    rows = [f"{'phase':<16} {'start':>7} {'end':>7} {'peak':>7} {'+peak':>6} {'anon':>6} {'file':>6}  (MB)"]
    seen: Dict[str, int] = {}
    for p in phases:
        seen[p["phase"]] = seen.get(p["phase"], 0) + 1
        name = p["phase"] if seen[p["phase"]] == 1 else f"{p['phase']} #{seen[p['phase']]}"
        mb = [round(p[k] / 1024, 1) for k in ("start", "end", "peak")]
        rows.append(f"{name:<16} {mb[0]:7.1f} {mb[1]:7.1f} {mb[2]:7.1f} {mb[2] - mb[0]:6.1f} "
                    f"{p['anon'] / 1024:6.1f} {p['file'] / 1024:6.1f}")
    return "\n".join(rows)


def main(argv: Optional[List[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        sys.exit(child(argv[1:]))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--plain", action="store_true", help="the worker unprobed: its VmHWM after the rounds only")
    args = parser.parse_args(argv)
    result = run(args.data_dir.resolve(), args.rounds, args.plain)
    if result["phases"]:
        print(table(result["phases"]))
    result["load_1min"] = round(os.getloadavg()[0], 2)
    print(json.dumps({k: v for k, v in result.items() if k != "phases"}))


if __name__ == "__main__":
    main()
