"""`make run-local`: the reference federation on one machine.

Starts alice (digits 0-3), bob (4-6), charlie (7-9) and the evaluator as separate
processes on localhost, waits until each reports SERVING over gRPC health, runs the
coordinator with the reference recipe, and stops every process it started on success,
failure or Ctrl-C. Arguments after `--` go to the coordinator unchanged.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import os
import signal
import sys
import time
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

WORKERS: Sequence[Tuple[str, str]] = (("alice", "0-3"), ("bob", "4-6"), ("charlie", "7-9"))
EVALUATOR = "testing"


def parse_args(argv: List[str]) -> Tuple[argparse.Namespace, List[str]]:
    extra: List[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--seed", type=int, help="run seed (default: the coordinator's)")
    parser.add_argument("--out", type=Path, required=True, help="run folder: model, metrics.jsonl, logs/")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--base-port", type=int, default=8777, help="alice's port; bob, charlie, testing follow")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker (3 workers share the cores)")
    parser.add_argument("--eval-threads", type=int, default=os.cpu_count() or 1, help="torch threads of the evaluator")
    parser.add_argument("--model", default="mnist-cnn")
    parser.add_argument("--start-timeout", type=float, default=120.0)
    return parser.parse_args(argv), extra


def _die_with_parent() -> None:
    """Linux: a service gets SIGTERM if this launcher dies, even by SIGKILL."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class Fleet:
    def __init__(self) -> None:
        self.procs: List[Tuple[str, asyncio.subprocess.Process]] = []

    async def start(self, name: str, argv: List[str], log_path: Path) -> asyncio.subprocess.Process:
        log_file = log_path.open("ab")
        proc = await asyncio.create_subprocess_exec(
            *argv, stdout=None, stderr=log_file, start_new_session=True,
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )
        log_file.close()
        self.procs.append((name, proc))
        return proc

    async def stop(self, grace: float = 10.0) -> None:
        for _, proc in self.procs:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
        for name, proc in self.procs:
            try:
                await asyncio.wait_for(proc.wait(), grace)
            except asyncio.TimeoutError:
                print(f"run-local: {name} ignored SIGTERM for {grace:.0f}s; killing it", file=sys.stderr)
                proc.kill()
                await proc.wait()


async def wait_serving(name: str, address: str, proc: asyncio.subprocess.Process, timeout: float) -> None:
    """Wait for SERVING on the health service, failing fast if the process exits."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        check = asyncio.ensure_future(stub.Check(health_pb2.HealthCheckRequest(), wait_for_ready=True, timeout=timeout))
        died = asyncio.ensure_future(proc.wait())
        done, _ = await asyncio.wait({check, died}, return_when=asyncio.FIRST_COMPLETED)
        if died in done:
            check.cancel()
            raise RuntimeError(f"{name} exited with status {proc.returncode} before serving; see its log")
        died.cancel()
        status = check.result().status
        if status != health_pb2.HealthCheckResponse.SERVING:
            raise RuntimeError(f"{name} at {address} reports {health_pb2.HealthCheckResponse.ServingStatus.Name(status)}")


async def main_async(args: argparse.Namespace, extra: List[str]) -> int:
    logs = args.out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    jetfed = [sys.executable, "-m", "jetfed.cli"]
    common = ["--host", args.host, "--data-dir", args.data_dir, "--no-download", "--model", args.model]
    fleet = Fleet()
    started = time.perf_counter()
    try:
        waits = []
        for offset, (name, labels) in enumerate(WORKERS):
            port = args.base_port + offset
            proc = await fleet.start(name, [*jetfed, "worker", "--name", name, "--port", str(port), "--labels", labels,
                                            "--threads", str(args.threads), *common], logs / f"{name}.log")
            waits.append(wait_serving(name, f"{args.host}:{port}", proc, args.start_timeout))
        eval_port = args.base_port + len(WORKERS)
        proc = await fleet.start(EVALUATOR, [*jetfed, "evaluator", "--name", EVALUATOR, "--port", str(eval_port),
                                             "--threads", str(args.eval_threads), *common], logs / f"{EVALUATOR}.log")
        waits.append(wait_serving(EVALUATOR, f"{args.host}:{eval_port}", proc, args.start_timeout))
        await asyncio.gather(*waits)
        print(f"run-local: {len(waits)} services SERVING after {time.perf_counter() - started:.1f}s; logs in {logs}", flush=True)
        coordinator = [*jetfed, "coordinator", "--rounds", str(args.rounds), "--out", str(args.out), "--model", args.model,
                       *[f"--worker={n}={args.host}:{args.base_port + i}" for i, (n, _) in enumerate(WORKERS)],
                       f"--evaluator={EVALUATOR}={args.host}:{eval_port}"]
        if args.seed is not None:
            coordinator += ["--seed", str(args.seed)]
        proc = await fleet.start("coordinator", [*coordinator, *extra], logs / "coordinator.log")
        code = await proc.wait()
        print(f"run-local: finished in {time.perf_counter() - started:.1f}s, coordinator exit status {code}", flush=True)
        return code
    except RuntimeError as exc:
        print(f"run-local: {exc}", file=sys.stderr)
        return 1
    finally:
        await fleet.stop()


async def run_interruptible(args: argparse.Namespace, extra: List[str]) -> int:
    """Ctrl-C or SIGTERM cancels the run; main_async's cleanup then stops the fleet."""
    task = asyncio.ensure_future(main_async(args, extra))
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, task.cancel)
    try:
        return await task
    except asyncio.CancelledError:
        print("run-local: interrupted; every service stopped", file=sys.stderr)
        return 130


def main(argv: Optional[List[str]] = None) -> int:
    args, extra = parse_args(sys.argv[1:] if argv is None else argv)
    return asyncio.run(run_interruptible(args, extra))


if __name__ == "__main__":
    sys.exit(main())
