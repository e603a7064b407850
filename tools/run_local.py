"""`make run-local`: the reference federation on one machine.

Starts the workers and the evaluator of a federation config (examples/federation.toml:
alice 0-3, bob 4-6, charlie 7-9, testing) as separate processes, waits until each
reports SERVING over gRPC health, runs the coordinator with that config, and stops
every process it started on success, failure or Ctrl-C. Arguments after `--` go to the
coordinator unchanged.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Optional, Tuple

from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from coordinator.config_file import load_config, worker_labels
from jetfed.errors import JetfedError
from jetfed.signals import cancel_on_signals
from jetfed.tls import channel_credentials

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "examples" / "federation.toml"
COORDINATOR = "coordinator"


@dataclass(frozen=True)
class Endpoint:
    name: str
    host: str
    port: int
    labels: str = "all"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def endpoints(config: Path, base_port: Optional[int], host: Optional[str]) -> Tuple[List[Endpoint], Endpoint]:
    """Workers and evaluator as the config places them; --base-port/--host move them all."""
    values = load_config(config)
    labels = worker_labels(config)
    places = [(name, address) for name, address in values["worker"]]
    places.append(tuple(values["evaluator"].split("=", 1)))
    found = []
    for index, (name, address) in enumerate(places):
        config_host, _, port = address.rpartition(":")
        found.append(Endpoint(name, host or config_host, base_port + index if base_port else int(port),
                              labels.get(name, "all")))
    return found[:-1], found[-1]


def parse_args(argv: List[str]) -> Tuple[argparse.Namespace, List[str]]:
    extra: List[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=CONFIG, help="the federation (default: examples/federation.toml)")
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--rounds", type=int, help="override the config's rounds")
    parser.add_argument("--seed", type=int, help="override the config's seed")
    parser.add_argument("--out", type=Path, required=True, help="run folder: model, metrics.jsonl, logs/")
    parser.add_argument("--host", help="bind and connect here instead of the config's hosts")
    parser.add_argument("--base-port", type=int, help="first service's port, the others follow (default: the config's)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker (3 workers share the cores)")
    parser.add_argument("--eval-threads", type=int, default=os.cpu_count() or 1, help="torch threads of the evaluator")
    parser.add_argument("--model", default="mnist-cnn")
    parser.add_argument("--start-timeout", type=float, default=120.0)
    parser.add_argument("--tls", action="store_true",
                        help="provision a CA and certificates into OUT/pki and run everything over mutual TLS")
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


def provision(pki: Path, workers: List[Endpoint], evaluator: Endpoint) -> None:
    """A private CA and one certificate per node, as an operator would with `jetfed certs`."""
    args = [sys.executable, "-m", "jetfed.cli", "certs", "--out", str(pki), "--coordinator", COORDINATOR,
            "--evaluator", f"{evaluator.name}={evaluator.host}"]
    args += [arg for w in workers for arg in ("--worker", f"{w.name}={w.host}")]
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL)


def tls_flags(pki: Optional[Path], node: str) -> List[str]:
    if pki is None:
        return []
    folder = pki / node
    return ["--tls-cert", str(folder / f"{node}.crt"), "--tls-key", str(folder / f"{node}.key"),
            "--tls-ca", str(folder / "ca.crt")]


def health_channel(address: str, pki: Optional[Path]) -> grpc.aio.Channel:
    if pki is None:
        return grpc.aio.insecure_channel(address)
    folder = pki / COORDINATOR
    credentials = channel_credentials(folder / "ca.crt", folder / f"{COORDINATOR}.crt", folder / f"{COORDINATOR}.key")
    return grpc.aio.secure_channel(address, credentials)


async def wait_serving(
    name: str, address: str, proc: asyncio.subprocess.Process, timeout: float, pki: Optional[Path]
) -> None:
    """Wait for SERVING on the health service, failing fast if the process exits."""
    async with health_channel(address, pki) as channel:
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
    common = ["--data-dir", args.data_dir, "--no-download", "--model", args.model]
    fleet = Fleet()
    started = time.perf_counter()
    try:
        workers, evaluator = endpoints(args.config, args.base_port, args.host)
        pki = args.out / "pki" if args.tls else None
        if pki is not None:
            provision(pki, workers, evaluator)
        waits = []
        for worker in workers:
            proc = await fleet.start(worker.name, [
                *jetfed, "worker", "--name", worker.name, "--host", worker.host, "--port", str(worker.port),
                "--labels", worker.labels, "--threads", str(args.threads), *common, *tls_flags(pki, worker.name)],
                logs / f"{worker.name}.log")
            waits.append(wait_serving(worker.name, worker.address, proc, args.start_timeout, pki))
        proc = await fleet.start(evaluator.name, [
            *jetfed, "evaluator", "--name", evaluator.name, "--host", evaluator.host, "--port", str(evaluator.port),
            "--threads", str(args.eval_threads), *common, *tls_flags(pki, evaluator.name)],
            logs / f"{evaluator.name}.log")
        waits.append(wait_serving(evaluator.name, evaluator.address, proc, args.start_timeout, pki))
        await asyncio.gather(*waits)
        print(f"run-local: {len(waits)} services SERVING after {time.perf_counter() - started:.1f}s; logs in {logs}", flush=True)
        coordinator = [*jetfed, "coordinator", "--config", str(args.config), "--out", str(args.out), "--model", args.model,
                       *[f"--worker={w.name}={w.address}" for w in workers],
                       f"--evaluator={evaluator.name}={evaluator.address}", *tls_flags(pki, COORDINATOR)]
        if args.base_port:
            coordinator += ["--status-address", f"{evaluator.host}:{evaluator.port + 1}"]
        if args.rounds is not None:
            coordinator += ["--rounds", str(args.rounds)]
        if args.seed is not None:
            coordinator += ["--seed", str(args.seed)]
        proc = await fleet.start("coordinator", [*coordinator, *extra], logs / "coordinator.log")
        code = await proc.wait()
        print(f"run-local: finished in {time.perf_counter() - started:.1f}s, coordinator exit status {code}", flush=True)
        return code
    except (RuntimeError, JetfedError) as exc:
        print(f"run-local: {exc}", file=sys.stderr)
        return 1
    finally:
        await fleet.stop()


async def run_interruptible(args: argparse.Namespace, extra: List[str]) -> int:
    """Ctrl-C or SIGTERM cancels the run; main_async's cleanup then stops the fleet."""
    try:
        return await cancel_on_signals(main_async(args, extra))
    except asyncio.CancelledError:
        print("run-local: interrupted; every service stopped", file=sys.stderr)
        return 130


def main(argv: Optional[List[str]] = None) -> int:
    args, extra = parse_args(sys.argv[1:] if argv is None else argv)
    return asyncio.run(run_interruptible(args, extra))


if __name__ == "__main__":
    sys.exit(main())
