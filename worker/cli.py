"""`jetfed worker`: load this board's partition, then serve Train and Evaluate."""

from __future__ import annotations

import argparse
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import List, Optional

from jetfed import devices, stream
from jetfed.config import DEFAULT_MAX_EXAMPLES_PER_ROUND, WORK_SETTING, work_limit
from jetfed.data import format_counts, load_mnist, parse_labels, resolve_data_dir
from jetfed.service_cli import (
    host_until_signal, max_payload_bytes, run_service, server_security, service_parser, start_telemetry, stream_limit,
)
from jetfed.training import DeviceData
from jetfed.v1 import worker_pb2, worker_pb2_grpc
from worker.service import WorkerService

log = logging.getLogger("worker")


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    # Train takes one stream at a time under the worker's own lock; the limit is Evaluate's.
    parser = service_parser("jetfed worker", __doc__, default_port=8777, default_streams=2)
    parser.add_argument("--name", required=True, help="this worker's name, e.g. alice")
    parser.add_argument("--labels", default="all", help="labels this worker holds: 0-3, 4,5,6 or all")
    parser.add_argument("--chunk-bytes", type=int, default=stream.DEFAULT_CHUNK_BYTES, help="size of streamed weight chunks")
    parser.add_argument(
        WORK_SETTING, type=int, default=DEFAULT_MAX_EXAMPLES_PER_ROUND,
        help="examples one Train may ask for (epochs x examples per epoch); more is refused with INVALID_ARGUMENT "
             f"(default {DEFAULT_MAX_EXAMPLES_PER_ROUND}; the reference recipe needs 320)",
    )
    return parser.parse_args(argv)


async def serve(args: argparse.Namespace) -> None:
    descriptor = worker_pb2.DESCRIPTOR.services_by_name["Worker"]
    security = server_security(args, descriptor, f"worker {args.name} on {args.host}:{args.port}")
    admission = stream_limit(args, descriptor, ["Evaluate"], f"worker {args.name}")
    payload_limit = max_payload_bytes(args)
    work = work_limit(args.max_examples_per_round)
    devices.set_threads(args.threads)
    device = devices.resolve_device(args.device)
    stream.check_chunk_size(args.chunk_bytes)
    labels = parse_labels(args.labels)
    data = load_mnist(resolve_data_dir(args.data_dir), "train", download=not args.no_download).subset(labels)
    counts = data.label_counts()
    print(f"MNIST train set on {args.name}: {format_counts(counts)}", flush=True)
    label = devices.describe(device)
    log.info("worker=%s device=%s model=%s max_payload_bytes=%d", args.name, label, args.model, payload_limit)
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="torch")
    telemetry = start_telemetry(args)
    service = WorkerService(
        args.name, args.model, DeviceData.from_images(data, device), counts, label, executor,
        args.chunk_bytes, payload_limit, args.receive_timeout, telemetry, work,
    )
    service.warm_up()
    try:
        await host_until_signal(
            args, descriptor, lambda server: worker_pb2_grpc.add_WorkerServicer_to_server(service, server),
            security, executor, telemetry, admission, service.report_health_through,
        )
    finally:
        await service.stop_training()


def main(argv: Optional[List[str]] = None) -> int:
    return run_service(serve, parse_args(argv))
