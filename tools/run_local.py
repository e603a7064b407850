"""`make run-local`: the reference federation on one machine.

Checks everything it can first (the coordinator's settings, the MNIST files, the run
folder, every port), then starts the workers and the evaluator of a federation config
(examples/federation.toml: alice 0-3, bob 4-6, charlie 7-9, testing) as separate
processes, waits until each reports SERVING over gRPC health, runs the coordinator with
that config, and stops every process it started on success, failure or Ctrl-C. A
failure shows the failing service's last log lines; an interrupted run prints the
command that resumes it (--resume DIR). Arguments after `--` go to the coordinator
unchanged.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Tuple

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from jetfed.errors import JetfedError
from jetfed.signals import cancel_on_signals
from jetfed.tls import channel_credentials
from preflight import COORDINATOR, Endpoint, Plan, Refused, make_plan, tls_flags

ROOT = Path(__file__).resolve().parent.parent
HELD_COORDINATOR = Path(__file__).resolve().parent / "held_coordinator.py"
CONFIG = ROOT / "examples" / "federation.toml"
TAIL_LINES = 15
# The make variables behind each launcher setting, for messages and the resume command.
MAKE_VARIABLES = ("DATA_DIR", "CONFIG", "ROUNDS", "SEED", "TLS", "BASE_PORT", "METRICS", "DEVICE", "ARGS")


def parse_args(argv: List[str]) -> Tuple[argparse.Namespace, List[str]]:
    extra: List[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=CONFIG, help="the federation (default: examples/federation.toml)")
    parser.add_argument("--data-dir", type=Path, required=True, help="folder with the four MNIST IDX files")
    parser.add_argument("--rounds", type=int, help="override the config's rounds")
    parser.add_argument("--seed", type=int, help="override the config's seed")
    parser.add_argument("--out", type=Path, help="a new run's folder: model, metrics.jsonl, logs/")
    parser.add_argument("--resume", type=Path, metavar="DIR", help="continue the interrupted run in DIR (not with --out)")
    parser.add_argument("--host", help="bind and connect here instead of the config's hosts")
    parser.add_argument("--base-port", type=int, help="first service's port, the others follow (default: the config's)")
    parser.add_argument("--metrics-address", metavar="HOST:PORT", help="the coordinator's Prometheus endpoint")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker (3 workers share the cores)")
    parser.add_argument("--eval-threads", type=int, default=os.cpu_count() or 1, help="torch threads of the evaluator")
    parser.add_argument("--model", help="the task's model (default: the config's, else the task's own)")
    parser.add_argument("--device", help="the workers' and evaluator's --device: auto (their default: CUDA when "
                        "available), cpu, cuda or cuda:N")
    parser.add_argument("--start-timeout", type=float, default=120.0)
    parser.add_argument("--tls", action="store_true",
                        help="provision a CA and certificates into OUT/pki and run everything over mutual TLS")
    # Set by the Makefile: the variables given on make's command line; messages then use them.
    parser.add_argument("--from-make", metavar="VARIABLES", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in ("config", "data_dir", "out", "resume"):
        if getattr(args, name) is not None:
            setattr(args, name, getattr(args, name).expanduser())
    return args, extra


def _die_with_parent() -> None:
    """Linux: a service gets SIGTERM if this launcher dies, even by SIGKILL."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


@dataclass
class Service:
    name: str
    proc: asyncio.subprocess.Process
    log: Path
    log_start: int  # this attempt's part of an appended (resumed) log begins here

    def tail(self, lines: int = TAIL_LINES) -> str:
        """This attempt's last log lines, indented, for the terminal."""
        with self.log.open("rb") as handle:
            handle.seek(self.log_start)
            text = handle.read().decode(errors="replace")
        kept = text.rstrip("\n").splitlines()[-lines:] or ["(its log is empty)"]
        return "\n".join(f"  | {line}" for line in kept)


class Fleet:
    def __init__(self) -> None:
        self.services: List[Service] = []

    async def start(self, name: str, argv: List[str], log_path: Path) -> asyncio.subprocess.Process:
        with log_path.open("ab") as log_file:
            start = log_file.tell()
            proc = await asyncio.create_subprocess_exec(
                *argv, stdout=None, stderr=log_file, start_new_session=True,
                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
            )
        self.services.append(Service(name, proc, log_path, start))
        return proc

    async def release(self, held: Optional[asyncio.subprocess.Process], argv: List[str],
                      log_path: Path) -> asyncio.subprocess.Process:
        """The coordinator with `argv`: the held one told to run (its imports done while
        the services started), or a fresh one if it is gone or cannot be told."""
        if held is not None and held.returncode is None and held.stdin is not None:
            with log_path.open("ab") as log_file:
                start = log_file.tell()
            order = json.dumps({"log": str(log_path), "argv": argv}) + "\n"
            try:
                held.stdin.write(order.encode())
                await held.stdin.drain()
                held.stdin.close()
            except (BrokenPipeError, ConnectionResetError):
                pass
            else:
                self.services.append(Service(COORDINATOR, held, log_path, start))
                return held
        await discard(held)
        return await self.start(COORDINATOR, [sys.executable, "-m", "jetfed.cli", "coordinator", *argv], log_path)

    def exited(self) -> List[Service]:
        """Services that ended on their own with a failure (before being stopped)."""
        return [s for s in self.services if s.proc.returncode not in (None, 0)]

    async def stop(self, grace: float = 10.0) -> None:
        """The coordinator first, so it records the round it is in (or drops it) while the
        workers still answer; then the services, together."""
        coordinator = [s for s in self.services if s.name == COORDINATOR]
        for group in (coordinator, [s for s in self.services if s.name != COORDINATOR]):
            for service in group:
                if service.proc.returncode is None:
                    service.proc.send_signal(signal.SIGTERM)
            for service in group:
                try:
                    await asyncio.wait_for(service.proc.wait(), grace)
                except asyncio.TimeoutError:
                    print(f"run-local: {service.name} ignored SIGTERM for {grace:.0f}s; killing it", file=sys.stderr)
                    service.proc.kill()
                    await service.proc.wait()


class ServiceFailed(Exception):
    """A service ended before serving; the message and its log tail say why."""


async def hold_coordinator() -> Optional[asyncio.subprocess.Process]:
    """A coordinator process that imports what it needs, then waits to be told to run
    (held_coordinator.py); None where it cannot start (the coordinator then starts
    after the services, as it would anyway)."""
    try:
        return await asyncio.create_subprocess_exec(
            sys.executable, str(HELD_COORDINATOR), stdin=subprocess.PIPE, stdout=None, stderr=subprocess.DEVNULL,
            start_new_session=True, preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )
    except OSError:
        return None


async def discard(held: Optional[asyncio.subprocess.Process]) -> None:
    """End a held coordinator that will not run: it has started and written nothing."""
    if held is not None and held.returncode is None:
        held.kill()
        await held.wait()


def provision(pki: Path, workers: List[Endpoint], evaluator: Endpoint) -> None:
    """A private CA and one certificate per node, as an operator would with `jetfed certs`."""
    args = [sys.executable, "-m", "jetfed.cli", "certs", "--out", str(pki), "--coordinator", COORDINATOR,
            "--evaluator", f"{evaluator.name}={evaluator.host}"]
    args += [arg for w in workers for arg in ("--worker", f"{w.name}={w.host}")]
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL)


# A service is asked until it serves: with gRPC's default reconnect backoff (1 s, then
# x1.6 up to 2 minutes) a port opened 5 s after start was seen 1-3 s late, and the
# coordinator started that much later. Every 0.1-0.25 s costs nothing on loopback.
READINESS_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 250),
)


def health_channel(address: str, pki: Optional[Path]) -> grpc.aio.Channel:
    if pki is None:
        return grpc.aio.insecure_channel(address, options=READINESS_OPTIONS)
    folder = pki / COORDINATOR
    credentials = channel_credentials(folder / "ca.crt", folder / f"{COORDINATOR}.crt", folder / f"{COORDINATOR}.key")
    return grpc.aio.secure_channel(address, credentials, options=READINESS_OPTIONS)


async def wait_serving(service: Service, address: str, timeout: float, pki: Optional[Path]) -> None:
    """Wait for SERVING on the health service, failing fast if the process exits."""
    async with health_channel(address, pki) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        check = asyncio.ensure_future(stub.Check(health_pb2.HealthCheckRequest(), wait_for_ready=True, timeout=timeout))
        died = asyncio.ensure_future(service.proc.wait())
        done, _ = await asyncio.wait({check, died}, return_when=asyncio.FIRST_COMPLETED)
        if died in done:
            check.cancel()
            raise ServiceFailed(f"{service.name} exited with status {service.proc.returncode} before serving; "
                                f"the last lines of {service.log}:\n{service.tail()}")
        died.cancel()
        try:
            status = check.result().status
        except grpc.aio.AioRpcError as exc:
            raise ServiceFailed(f"{service.name} at {address} did not answer within {timeout:.0f}s "
                                f"({exc.code().name}); the last lines of {service.log}:\n{service.tail()}") from None
        if status != health_pb2.HealthCheckResponse.SERVING:
            name = health_pb2.HealthCheckResponse.ServingStatus.Name(status)
            raise ServiceFailed(f"{service.name} at {address} reports {name}")


async def start_services(plan: Plan, fleet: Fleet, logs: Path, pki: Optional[Path]) -> None:
    """Workers and evaluator, started together and awaited until all serve."""
    args = plan.args
    jetfed = [sys.executable, "-m", "jetfed.cli"]
    common = ["--no-download", *(["--model", args.model] if args.model else []),
              *(["--device", args.device] if args.device else [])]
    waits = []
    for worker in plan.workers:
        await fleet.start(worker.name, [
            *jetfed, "worker", "--name", worker.name, "--host", worker.host, "--port", str(worker.port),
            "--threads", str(args.threads), *worker.flags, *common, *tls_flags(pki, worker.name)],
            logs / f"{worker.name}.log")
        waits.append(wait_serving(fleet.services[-1], worker.address, args.start_timeout, pki))
    evaluator = plan.evaluator
    await fleet.start(evaluator.name, [
        *jetfed, "evaluator", "--name", evaluator.name, "--host", evaluator.host, "--port", str(evaluator.port),
        "--threads", str(args.eval_threads), *evaluator.flags, *common, *tls_flags(pki, evaluator.name)],
        logs / f"{evaluator.name}.log")
    waits.append(wait_serving(fleet.services[-1], evaluator.address, args.start_timeout, pki))
    await asyncio.gather(*waits)


async def run_fleet(plan: Plan, held: Optional[asyncio.subprocess.Process] = None) -> int:
    """Services, then the coordinator (`held` if given); any failure ends with the
    reason on the terminal."""
    logs = plan.out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    fleet = Fleet()
    started = time.perf_counter()
    try:
        pki = plan.out / "pki" if plan.args.tls else None
        if pki is not None and not (pki / "ca.crt").is_file():
            provision(pki, plan.workers, plan.evaluator)
        await start_services(plan, fleet, logs, pki)
        print(f"run-local: {len(fleet.services)} services SERVING after {time.perf_counter() - started:.1f}s; "
              f"logs in {logs}", flush=True)
        proc = await fleet.release(held, plan.coordinator_argv(pki), logs / "coordinator.log")
        code = await proc.wait()
        print(f"run-local: finished in {time.perf_counter() - started:.1f}s, coordinator exit status {code}", flush=True)
        for service in fleet.exited():
            print(f"run-local: {service.name} exited with status {service.proc.returncode}; the last lines of "
                  f"{service.log}:\n{service.tail()}", file=sys.stderr)
        return code
    except (ServiceFailed, JetfedError, subprocess.CalledProcessError) as exc:
        print(f"run-local: {exc}", file=sys.stderr)
        return 1
    finally:
        await fleet.stop()
        await discard(held)


async def run_interruptible(plan: Plan, held: Optional[asyncio.subprocess.Process] = None) -> int:
    """Ctrl-C or SIGTERM cancels the run; run_fleet's cleanup then stops every process."""
    try:
        return await cancel_on_signals(run_fleet(plan, held))
    except asyncio.CancelledError:
        print("run-local: interrupted; every service stopped", file=sys.stderr)
        return 130


def resume_command(plan: Plan, argv: List[str]) -> str:
    """What the user types to continue this run: the make form under make (the variables
    they gave, OUT replaced by RESUME), else this launcher's argv with --resume."""
    args = plan.args
    if plan.wording.from_make:
        values = {"DATA_DIR": args.data_dir, "CONFIG": args.config, "ROUNDS": args.rounds, "SEED": args.seed,
                  "TLS": 1, "BASE_PORT": args.base_port, "METRICS": args.metrics_address,
                  "DEVICE": args.device,
                  "ARGS": " ".join(shlex.quote(word) for word in plan.extra)}
        given = [name for name in args.from_make.split() if name in MAKE_VARIABLES]
        words = ["make", "run-local", f"RESUME={shlex.quote(str(plan.out))}",
                 *[f"{name}={shlex.quote(str(values[name]))}" for name in given]]
        return " ".join(words)
    kept, skip = [], False
    cut = argv.index("--") if "--" in argv else len(argv)
    for word in argv[:cut]:
        if not skip and word not in ("--out", "--resume") and not word.startswith(("--out=", "--resume=")):
            kept.append(word)
        skip = word in ("--out", "--resume") and not skip
    return shlex.join([shown(sys.executable), shown(__file__), *kept, "--resume", str(plan.out), *argv[cut:]])


def shown(path: str) -> str:
    """`path` relative to the working directory when it lies below it: shorter to read."""
    relative = os.path.relpath(path)
    return path if relative.startswith("..") else relative


def settle(plan: Plan, code: int, argv: List[str], made: bool) -> None:
    """After the run: a folder where no round finished goes (its reason is on the
    terminal already); one with a checkpoint stays, and an unfinished one says how to resume."""
    if code == 0:
        return
    from coordinator.checkpoint import saved_round

    done = saved_round(plan.out / "checkpoint")
    if done is None and plan.args.resume is None:
        if made:
            shutil.rmtree(plan.out, ignore_errors=True)
        else:
            for entry in plan.out.iterdir():
                if entry.is_dir():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink()
        print(f"run-local: no round finished, so {plan.out} is removed", file=sys.stderr)
    elif done is not None:
        print(f"run-local: the run in {plan.out} is kept at round {done}; resume it with:\n"
              f"  {resume_command(plan, argv)}", file=sys.stderr)


async def launch(args: argparse.Namespace, extra: List[str], argv: List[str]) -> int:
    """The checks, then the run. The coordinator process starts first, held: its imports
    run beside the checks' own, and nothing starts unless every check passes."""
    held = await hold_coordinator()
    try:
        plan = make_plan(args, extra)
    except Refused as exc:
        await discard(held)
        print(f"run-local: {exc}", file=sys.stderr)
        return 2
    except BaseException:
        await discard(held)
        raise
    made = not plan.out.exists()
    code = await run_interruptible(plan, held)
    settle(plan, code, argv, made)
    return code


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args, extra = parse_args(argv)
    return asyncio.run(launch(args, extra, argv))


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # Ctrl-C before the services started: nothing to stop
        sys.exit(130)
