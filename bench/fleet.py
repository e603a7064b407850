"""Zero-compute workers for scale studies (a harness, never a product flag): many real
`worker.service.WorkerService` servicers in one process, each behind its own grpc.aio
server on its own loopback port (health and reflection included, as `jetfed worker`
serves them), all on one event loop. Only the task is the harness's: its `train`
returns the received weights plus a tiny deterministic change, so a Train call costs
its wire alone (header checks, hash while receiving, decode, finiteness check, encode,
send) and what is measured on the coordinator is the coordinator.

- Every worker of a process shares one model instance (the servicer loads each round's
  weights into it) and one torch thread: mnist-cnn at 1,000 workers would otherwise
  hold 2 x 1.7 MB per worker, and resnet18 2 x 45 MB.
- Each worker holds `examples` examples (one blank image, zero-stride) whose labels
  follow a Dirichlet(0.5) draw over the ten digits, seeded by the worker's index: the
  label counts in GetInfo look like a non-IID board's, and a round's example count is
  what the config asks of that many examples (so the coordinator's claim check passes).
- InitialWeights would answer from the shared model, so a run starts from
  `write_init_weights` (the model built from a seed, as a worker would) through the
  coordinator's --init-weights.

Run as a child: `python bench/fleet.py serve --first 0 --count 250 [--model mnist-cnn]`
prints one JSON line {name: address} once every worker serves, and serves until its
stdin closes. `HarnessFleet` starts several such children and writes a federation.toml.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import Executor, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from jetfed import codec, serving, stream  # noqa: E402
from jetfed.config import TrainConfig  # noqa: E402
from jetfed.tasks import TaskSettings  # noqa: E402
from jetfed.tasks.base import TensorExamples, TrainOutcome  # noqa: E402
from jetfed.tasks.mnist import CLASSES, MnistTask  # noqa: E402

HOST = "127.0.0.1"
EXAMPLES = 60  # a worker's examples: MNIST's 60,000 over 1,000 boards
# Each change is this times 1..4 (by the round's seed) on every float coordinate: small,
# and within the coordinator's norm bound (10 x the round's median change).
STEP = 1e-4


def worker_name(index: int) -> str:
    return f"w{index:04d}"


class ZeroComputeTask(MnistTask):
    """mnist with a model built once per process and a round that computes nothing."""

    def __init__(self, settings: TaskSettings) -> None:
        super().__init__(settings)
        self._shared: Optional[torch.nn.Module] = None

    def build_model(self) -> torch.nn.Module:
        if self._shared is None:
            self._shared = super().build_model()
        return self._shared

    def train(self, model: torch.nn.Module, data: Any, config: TrainConfig, seed: int,
              stop: Any = None, controls: Any = None) -> TrainOutcome:
        """The received weights (already loaded into `model`) plus STEP x (1 + seed % 4)
        on every float tensor, as fresh tensors: the shared model is reloaded by the
        next worker's round before this one's result is encoded."""
        step = STEP * (1 + seed % 4)
        state = {name: (t + step) if t.is_floating_point() else t.clone() for name, t in model.state_dict().items()}
        return TrainOutcome(state=state, num_examples=config.examples_per_round(len(data)),
                            mean_loss=1.0 + (seed % 1000) / 1000, seconds=0.0)


def examples_of(index: int, count: int = EXAMPLES) -> TensorExamples:
    """`count` blank images whose labels follow a seeded Dirichlet(0.5) over the digits."""
    generator = torch.Generator().manual_seed(index)
    weights = torch.randn(len(CLASSES), generator=generator) ** 2 / 2 + 1e-3  # Gamma(0.5): a Dirichlet(0.5) draw
    targets = torch.multinomial(weights / weights.sum(), count, replacement=True, generator=generator)
    inputs = torch.zeros(1, 1, 28, 28).expand(count, 1, 28, 28)
    return TensorExamples(inputs, targets, torch.device("cpu"))


def write_init_weights(path: Path, model: str, seed: int = 1) -> int:
    """The model a worker builds for `seed`, as a safetensors file for --init-weights;
    returns its payload bytes (one model's bytes on the wire)."""
    task = MnistTask(TaskSettings(data_dir=Path("."), device=torch.device("cpu"), model=model))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        state = task.build_model().state_dict()
    _, payload = codec.encode(state, task.model_name)
    path.write_bytes(bytes(payload))
    return len(payload)


async def serve_workers(first: int, count: int, model: str, chunk_bytes: int,
                        ready: "asyncio.Future[Dict[str, str]]", stop: asyncio.Event) -> None:
    """Start workers first..first+count-1 on port 0 each; `ready` gets their addresses."""
    from jetfed.v1 import worker_pb2, worker_pb2_grpc
    from worker.service import WorkerService

    cpu = torch.device("cpu")
    task = ZeroComputeTask(TaskSettings(data_dir=Path("."), device=cpu, model=model))
    executor: Executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="torch")
    full_name = worker_pb2.DESCRIPTOR.services_by_name["Worker"].full_name
    payload_limit = stream.DEFAULT_MAX_PAYLOAD_BYTES
    running: List[serving.RunningServer] = []
    addresses: Dict[str, str] = {}
    try:
        for index in range(first, first + count):
            name = worker_name(index)
            service = WorkerService(name, task, examples_of(index), device_label="cpu", executor=executor,
                                    chunk_bytes=chunk_bytes, max_payload_bytes=payload_limit)

            def add(server: Any, service: WorkerService = service) -> None:
                worker_pb2_grpc.add_WorkerServicer_to_server(service, server)

            server = await serving.start_server([serving.Service(full_name, add)], HOST, 0)
            running.append(server)
            addresses[name] = f"{HOST}:{server.port}"
        ready.set_result(addresses)
        await stop.wait()
    finally:
        await asyncio.gather(*(server.stop(0) for server in running), return_exceptions=True)
        executor.shutdown(wait=False)


async def _serve_child(args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    loop = asyncio.get_running_loop()
    ready: "asyncio.Future[Dict[str, str]]" = loop.create_future()
    stop = asyncio.Event()
    serving_task = asyncio.ensure_future(serve_workers(args.first, args.count, args.model, args.chunk_bytes,
                                                       ready, stop))
    done, _ = await asyncio.wait([ready, serving_task], return_when=asyncio.FIRST_COMPLETED)
    if serving_task in done:
        serving_task.result()  # raises what stopped it
    print(json.dumps(ready.result()), flush=True)
    await loop.run_in_executor(None, sys.stdin.read)  # until the parent closes it
    stop.set()
    await serving_task


class HarnessFleet:
    """`workers` zero-compute workers in `processes` child processes (the cores serve the
    coordinator and the fleet alike; one process per core at most is the fair share).

    Use as a context manager; `addresses` maps names to HOST:PORT once it has entered."""

    def __init__(self, workers: int, *, processes: int = 1, model: str = "mnist-cnn",
                 chunk_bytes: int = stream.DEFAULT_CHUNK_BYTES, log_dir: Optional[Path] = None) -> None:
        self.workers, self.model, self.chunk_bytes = workers, model, chunk_bytes
        self.processes = max(1, min(processes, workers))
        self.log_dir = log_dir
        self.addresses: Dict[str, str] = {}
        self.children: List[subprocess.Popen] = []
        self.start_seconds = 0.0

    def __enter__(self) -> "HarnessFleet":
        started = time.perf_counter()
        per, extra = divmod(self.workers, self.processes)
        first = 0
        try:
            for k in range(self.processes):
                count = per + (1 if k < extra else 0)
                log = open(self.log_dir / f"fleet-{k}.log", "wb") if self.log_dir else subprocess.DEVNULL
                self.children.append(subprocess.Popen(
                    [sys.executable, str(Path(__file__).resolve()), "serve", "--first", str(first), "--count",
                     str(count), "--model", self.model, "--chunk-bytes", str(self.chunk_bytes)],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, cwd=ROOT, text=True,
                    env={**os.environ, "PYTHONPATH": str(ROOT)},
                ))
                first += count
            for child in self.children:
                assert child.stdout is not None
                line = child.stdout.readline()  # a child that fails exits, and this reads its EOF
                if not line:
                    raise RuntimeError(f"fleet process exited with {child.wait()} before serving "
                                       f"(see {self.log_dir or 'its stderr'})")
                self.addresses.update(json.loads(line))
        except BaseException:
            self.__exit__(None, None, None)
            raise
        self.start_seconds = time.perf_counter() - started
        return self

    def __exit__(self, *exc: Any) -> None:
        for child in self.children:
            if child.stdin is not None and not child.stdin.closed:
                child.stdin.close()
        for child in self.children:
            try:
                child.wait(30)
            except subprocess.TimeoutExpired:
                child.send_signal(signal.SIGKILL)
                child.wait()

    @property
    def pids(self) -> List[int]:
        return [child.pid for child in self.children]

    def federation_toml(self, path: Path, *, rounds: int, init_weights: Path, min_workers: Optional[int] = None,
                        round_timeout: float = 600.0, connect_timeout: float = 300.0, batches: int = 10,
                        batch_size: int = 32, strategy: str = "fedavg") -> Path:
        """A federation.toml for `jetfed coordinator --config`: these workers, no
        evaluator, the reference's training config, `strategy`, every worker required
        unless `min_workers` says otherwise."""
        lines = [
            "[federation]", f"rounds = {rounds}", f"eval_every = {rounds}", 'task = "mnist"',
            f'model = "{self.model}"', "seed = 1", f'init_weights = "{init_weights}"', "",
            "[training]", f"batch_size = {batch_size}", f"batches = {batches}", "",
            "[strategy]", f'name = "{strategy}"', "",
            "[faults]", f"round_timeout = {round_timeout}", f"connect_timeout = {connect_timeout}",
            f"min_workers = {min_workers if min_workers is not None else self.workers}", "",
        ]
        for name, address in self.addresses.items():
            lines += [f"[workers.{name}]", f'address = "{address}"', ""]
        path.write_text("\n".join(lines))
        return path


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="host zero-compute workers until stdin closes")
    serve.add_argument("--first", type=int, default=0, help="index of the first worker (names w0000, w0001, ...)")
    serve.add_argument("--count", type=int, required=True)
    serve.add_argument("--model", default="mnist-cnn")
    serve.add_argument("--chunk-bytes", type=int, default=stream.DEFAULT_CHUNK_BYTES)
    args = parser.parse_args(argv)
    asyncio.run(_serve_child(args))


if __name__ == "__main__":
    main()
