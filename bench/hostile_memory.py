"""The evaluator's memory under the issue's attack: concurrent Evaluate streams that
each announce and push hundreds of megabytes for a model of 1.7 MB. Before the limits
followed the model, each stream was buffered whole and then refused (0.7 GB -> 2.9 GB
for four of 400 MB); now each is refused at its header.

Starts a real evaluator (`--source` picks the tree it runs from, to measure an older
commit the same way), samples its VmRSS while the streams run, and prints one JSON line
with the baseline, the peak (sampled VmRSS and the kernel's VmHWM, which also holds
the start-up peak, printed apart), each stream's status and the wall time.

    .venv/bin/python bench/hostile_memory.py --data-dir ../shared/datasets/mnist
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import AsyncIterator, Dict, List

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from jetfed import codec, wire
from jetfed.models import build_model
from jetfed.v1 import evaluation_pb2, weights_pb2

CHUNK = 1 << 20
METHOD = "/jetfed.v1.Evaluator/Evaluate"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def proc_status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def wait_serving(address: str, process: subprocess.Popen, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise SystemExit(f"the evaluator exited with {process.returncode}")
            try:
                stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0, wait_for_ready=True)
                return
            except grpc.RpcError:
                continue
    raise SystemExit("the evaluator did not serve in time")


class RssSampler(threading.Thread):
    """The largest VmRSS seen every 10 ms, next to the kernel's own VmHWM."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.peak_kib = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.peak_kib = max(self.peak_kib, proc_status_kib(self.pid, "VmRSS"))
            time.sleep(0.01)


async def hostile_stream(address: str, announced: int, sent: int) -> str:
    """Announce `announced` bytes of real mnist-cnn tensors and push `sent` zero bytes."""
    manifest, _ = codec.encode(build_model("mnist-cnn").state_dict(), "mnist-cnn")
    head = wire.manifest_to_proto(manifest)
    head.total_bytes = announced
    zeros = bytes(CHUNK)

    async def requests() -> AsyncIterator[evaluation_pb2.EvaluateRequest]:
        yield evaluation_pb2.EvaluateRequest(header=evaluation_pb2.EvaluateHeader(tag="hostile", manifest=head))
        for offset in range(0, sent, CHUNK):
            data = zeros[:sent - offset]
            yield evaluation_pb2.EvaluateRequest(chunk=weights_pb2.WeightChunk(offset=offset, data=data))

    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.stream_unary(METHOD, request_serializer=evaluation_pb2.EvaluateRequest.SerializeToString)
        try:
            await call(requests(), timeout=600)
        except grpc.aio.AioRpcError as ended:
            return f"{ended.code().name}: {ended.details()[:120]}"
    return "OK"


async def attack(address: str, streams: int, megabytes: int) -> List[str]:
    size = megabytes * 1_000_000
    return list(await asyncio.gather(*(hostile_stream(address, size, size) for _ in range(streams))))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, required=True, help="folder with the MNIST IDX files")
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--megabytes", type=int, default=400, help="announced and sent by each stream")
    parser.add_argument("--source", type=Path, default=Path(__file__).resolve().parents[1],
                        help="the jetfed tree the evaluator runs from (default: this one)")
    parser.add_argument("--max-payload-bytes", type=int,
                        help="the evaluator's explicit limit (default: its own default)")
    args = parser.parse_args()
    limit = ["--max-payload-bytes", str(args.max_payload_bytes)] if args.max_payload_bytes else []
    port = free_port()
    address = f"127.0.0.1:{port}"
    evaluator = subprocess.Popen(
        [sys.executable, "-m", "jetfed.cli", "evaluator", "--host", "127.0.0.1", "--port", str(port),
         "--data-dir", str(args.data_dir.resolve()), "--no-download", "--threads", "1", "--log-level", "ERROR",
         *limit],
        cwd=args.source, stdout=subprocess.DEVNULL,
    )
    try:
        wait_serving(address, evaluator)
        baseline_kib = proc_status_kib(evaluator.pid, "VmRSS")
        start_peak_kib = proc_status_kib(evaluator.pid, "VmHWM")
        sampler = RssSampler(evaluator.pid)
        sampler.start()
        started = time.perf_counter()
        statuses = asyncio.run(attack(address, args.streams, args.megabytes))
        seconds = time.perf_counter() - started
        sampler.stop.set()
        sampler.join()
        result: Dict[str, object] = {
            "bench": "hostile_memory", "source": str(args.source), "max_payload_bytes": args.max_payload_bytes,
            "streams": args.streams,
            "megabytes_each": args.megabytes, "baseline_rss_mib": round(baseline_kib / 1024, 1),
            "start_up_peak_mib": round(start_peak_kib / 1024, 1),
            "peak_rss_sampled_mib": round(sampler.peak_kib / 1024, 1),
            "peak_rss_vmhwm_mib": round(proc_status_kib(evaluator.pid, "VmHWM") / 1024, 1),
            "seconds": round(seconds, 2), "statuses": statuses,
        }
        print(json.dumps(result))
    finally:
        evaluator.terminate()
        evaluator.wait(30)


if __name__ == "__main__":
    main()
