"""The weight stream against its ceilings, on loopback: for each chunk size, a resnet18
Train round trip through a real worker process next to a bare grpc.aio bidi echo of
the same bytes in the same chunks (the gRPC ceiling) and to memcpy of the same bytes.

- memcpy: the payload copied chunk by chunk into a preallocated buffer, MB/s of bytes
  copied (one copy, no wire).
- ceiling: a child process serving one bidi method with no (de)serializer; the call
  sends the payload as raw byte chunks, the server takes them all and sends them all
  back (the shape of a Train call), MB/s = 2 x payload / seconds.
- jetfed: coordinator.clients.WorkerClient.train against a worker process serving
  worker.service.WorkerService whose task trains nothing (a subclass in this file
  returns the received weights, the bench's harness, no product flag), so a call is the
  wire and its checks alone: encode, hash, split, send, receive, verify, decode, check
  finiteness, on both sides. The global model is encoded once, as a round does; MB/s =
  2 x payload / seconds.

Each figure is the median of --repeats calls after one warm-up call. Prints one JSON
line per chunk size. `--profile DIR` also writes cProfile stats of the jetfed calls,
the coordinator's side (coordinator-CHUNK.prof) and the worker's (worker-CHUNK.prof).

    .venv/bin/python bench/stream.py [--chunks 262144,1048576,3145728] [--repeats 5]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Dict, List, Optional

import grpc
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from coordinator.clients import Weights, WorkerClient  # noqa: E402
from jetfed import serving, stream  # noqa: E402
from jetfed.config import TrainConfig  # noqa: E402
from jetfed.tasks import TaskSettings  # noqa: E402
from jetfed.tasks.base import TensorExamples, TrainOutcome  # noqa: E402
from jetfed.tasks.mnist import MnistTask  # noqa: E402

HOST = "127.0.0.1"
MODEL = "resnet18"
ECHO_METHOD = "/bench.Echo/Echo"
CHUNKS = (256 << 10, 1 << 20, 3 << 20)
CONFIG = TrainConfig(batch_size=1, max_batches=1)


class NoTraining(MnistTask):
    """The bench's worker task: the round returns the weights it was given, so a Train
    call costs only its stream."""

    def train(self, model: torch.nn.Module, data: Any, config: TrainConfig, seed: int,
              stop: Any = None, controls: Any = None) -> TrainOutcome:
        return TrainOutcome(state=model.state_dict(), num_examples=1, mean_loss=0.0, seconds=0.0)


def global_weights() -> Weights:
    torch.manual_seed(0)
    task = NoTraining(TaskSettings(data_dir=Path("."), device=torch.device("cpu"), model=MODEL))
    return Weights.of(task.build_model().state_dict(), MODEL)


# ---- the child processes ----------------------------------------------------------

async def serve_echo(port: int) -> None:
    async def echo(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        received = [chunk async for chunk in requests]
        for chunk in received:
            yield chunk

    server = grpc.aio.server(options=serving.SERVER_OPTIONS)
    handler = grpc.stream_stream_rpc_method_handler(echo)
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("bench.Echo", {"Echo": handler})])
    bound = server.add_insecure_port(f"{HOST}:{port}")
    await server.start()
    print(bound, flush=True)
    await server.wait_for_termination()


async def serve_worker(port: int, chunk_bytes: int, profile: Optional[str]) -> None:
    from jetfed.v1 import worker_pb2, worker_pb2_grpc
    from worker.service import WorkerService

    torch.set_num_threads(1)  # as run-local starts its services on a shared machine
    cpu = torch.device("cpu")
    task = NoTraining(TaskSettings(data_dir=Path("."), device=cpu, model=MODEL))
    data = TensorExamples(torch.zeros(8, 1, 28, 28), torch.zeros(8, dtype=torch.int64), cpu)
    service = WorkerService("bench", task, data, device_label="cpu",
                            executor=ThreadPoolExecutor(max_workers=1), chunk_bytes=chunk_bytes,
                            max_payload_bytes=stream.DEFAULT_MAX_PAYLOAD_BYTES)
    full_name = worker_pb2.DESCRIPTOR.services_by_name["Worker"].full_name
    running = await serving.start_server(
        [serving.Service(full_name, lambda server: worker_pb2_grpc.add_WorkerServicer_to_server(service, server))],
        HOST, port,
    )
    profiler = cProfile.Profile() if profile else None
    if profiler:
        profiler.enable()
    print(running.port, flush=True)
    try:
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until the parent closes it
    finally:
        if profiler and profile:
            profiler.disable()
            profiler.dump_stats(profile)
        await running.stop(0)


# ---- the parent -------------------------------------------------------------------

class Child:
    """A server process of this file; its port is its first line."""

    def __init__(self, *args: str) -> None:
        self.process = subprocess.Popen([sys.executable, __file__, "serve", *args], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True, cwd=ROOT)
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise SystemExit(f"bench server {args} exited with {self.process.wait()}")
        self.address = f"{HOST}:{int(line)}"

    def close(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.terminate()
            self.process.wait(10)


def median_seconds(repeats: int, call: Callable[[], Any]) -> float:
    call()  # warm-up: connection, allocator growth, first-call costs
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def memcpy_seconds(payload: bytes, chunk_bytes: int, repeats: int) -> float:
    def copy() -> None:
        target = memoryview(bytearray(len(payload)))
        source = memoryview(payload)
        for offset in range(0, len(payload), chunk_bytes):
            target[offset:offset + chunk_bytes] = source[offset:offset + chunk_bytes]

    return median_seconds(repeats, copy)


async def echo_seconds(address: str, payload: bytes, chunk_bytes: int, repeats: int) -> float:
    chunks = [bytes(memoryview(payload)[o:o + chunk_bytes]) for o in range(0, len(payload), chunk_bytes)]
    async with grpc.aio.insecure_channel(address, options=serving.CHANNEL_OPTIONS) as channel:
        method = channel.stream_stream(ECHO_METHOD)

        async def one() -> None:
            call = method()
            for chunk in chunks:
                await call.write(chunk)
            await call.done_writing()
            back = 0
            async for chunk in call:
                back += len(chunk)
            assert back == len(payload)

        await one()
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            await one()
            times.append(time.perf_counter() - started)
    return statistics.median(times)


async def jetfed_seconds(address: str, weights: Weights, chunk_bytes: int, repeats: int,
                         profiler: Optional[cProfile.Profile]) -> float:
    client = WorkerClient("bench", address, chunk_bytes)
    client.expect(MODEL, weights.manifest.tensors, stream.payload_limit(weights.manifest.total_bytes))
    try:
        update = await client.train(0, CONFIG, weights, 120)
        assert update.weights.manifest.total_bytes == weights.manifest.total_bytes
        times = []
        for number in range(1, repeats + 1):
            if profiler:
                profiler.enable()
            started = time.perf_counter()
            await client.train(number, CONFIG, weights, 120)
            times.append(time.perf_counter() - started)
            if profiler:
                profiler.disable()
    finally:
        await client.close()
    return statistics.median(times)


def rate(moved: int, seconds: float) -> float:
    return round(moved / seconds / 1e6, 1)


def measure(chunk_bytes: int, weights: Weights, repeats: int, profile: Optional[Path]) -> Dict[str, Any]:
    payload = bytes(weights.payload)
    size = len(payload)
    copy = memcpy_seconds(payload, chunk_bytes, repeats)
    echo = Child("echo", "--port", "0")
    try:
        ceiling = asyncio.run(echo_seconds(echo.address, payload, chunk_bytes, repeats))
    finally:
        echo.close()
    worker_args = ["worker", "--port", "0", "--chunk-bytes", str(chunk_bytes)]
    if profile:
        worker_args += ["--profile", str(profile / f"worker-{chunk_bytes}.prof")]
    worker = Child(*worker_args)
    profiler = cProfile.Profile() if profile else None
    try:
        jetfed = asyncio.run(jetfed_seconds(worker.address, weights, chunk_bytes, repeats, profiler))
    finally:
        worker.close()
    if profiler and profile:
        profiler.dump_stats(str(profile / f"coordinator-{chunk_bytes}.prof"))
    return {
        "bench": "stream", "model": MODEL, "payload_bytes": size, "chunk_bytes": chunk_bytes, "repeats": repeats,
        "memcpy_mb_s": rate(size, copy), "ceiling_mb_s": rate(2 * size, ceiling),
        "jetfed_mb_s": rate(2 * size, jetfed), "jetfed_ms": round(jetfed * 1000, 1),
        "ceiling_ms": round(ceiling * 1000, 1), "of_ceiling": round(ceiling / jetfed, 3),
        "load_1min": round(os.getloadavg()[0], 2),
    }


def main(argv: Optional[List[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:
        parser = argparse.ArgumentParser(prog="bench/stream.py serve")
        parser.add_argument("kind", choices=["echo", "worker"])
        parser.add_argument("--port", type=int, default=0)
        parser.add_argument("--chunk-bytes", type=int, default=stream.DEFAULT_CHUNK_BYTES)
        parser.add_argument("--profile")
        served = parser.parse_args(argv[1:])
        if served.kind == "echo":
            asyncio.run(serve_echo(served.port))
        else:
            asyncio.run(serve_worker(served.port, served.chunk_bytes, served.profile))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chunks", default=",".join(str(c) for c in CHUNKS),
                        help="chunk sizes in bytes, comma-separated (each at most 3 MiB)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--profile", type=Path, help="folder for cProfile stats of the jetfed calls")
    args = parser.parse_args(argv)
    chunks = [stream.check_chunk_size(int(c)) for c in args.chunks.split(",")]
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
    weights = global_weights()
    for chunk_bytes in chunks:
        print(json.dumps(measure(chunk_bytes, weights, args.repeats, args.profile)), flush=True)


if __name__ == "__main__":
    main()
