"""`jetfed worker`: load this board's partition, then serve Train and Evaluate."""

from __future__ import annotations

import argparse
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import List, Optional

from jetfed import allocator, devices, privacy, scaffold, stream
from jetfed.config import DEFAULT_MAX_EXAMPLES_PER_ROUND, WORK_SETTING, work_limit
from jetfed.partitions import add_partition_arguments, partition_from_flags
from jetfed.service_cli import (
    host_until_signal, max_payload_bytes, run_service, server_security, service_parser, start_telemetry, stream_limit,
    task_from_args,
)
from jetfed.v1 import worker_pb2, worker_pb2_grpc
from worker.service import SLOWDOWN_SETTING, WorkerService, slowdown_factor

log = logging.getLogger("worker")


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    # Train takes one stream at a time under the worker's own lock; the limit is Evaluate's.
    parser = service_parser("jetfed worker", __doc__, default_port=8777, default_streams=2)
    parser.add_argument("--name", required=True, help="this worker's name, e.g. alice")
    add_partition_arguments(parser)
    parser.add_argument("--chunk-bytes", type=int, default=stream.DEFAULT_CHUNK_BYTES, help="size of streamed weight chunks")
    parser.add_argument(
        WORK_SETTING, type=int, default=DEFAULT_MAX_EXAMPLES_PER_ROUND,
        help="examples one Train may ask for (epochs x examples per epoch); more is refused with INVALID_ARGUMENT "
             f"(default {DEFAULT_MAX_EXAMPLES_PER_ROUND}; the reference recipe needs 320)",
    )
    parser.add_argument(
        SLOWDOWN_SETTING, type=float, default=1.0, metavar="FACTOR",
        help="emulate a board FACTOR times slower, for straggler benchmarks: after each round's training the worker "
             "waits (FACTOR-1) x its training time before answering, and reports the whole as the round's train "
             "seconds (default 1: this board's own speed; at most 1000)",
    )
    parser.add_argument(
        scaffold.STATE_DIR_SETTING, metavar="DIR",
        help="where this worker keeps its own state between rounds and across restarts: SCAFFOLD's control variate, "
             "per run and round (default: ~/.local/state/jetfed/NAME; created 0700 on first use)",
    )
    return parser.parse_args(argv)


async def serve(args: argparse.Namespace) -> None:
    descriptor = worker_pb2.DESCRIPTOR.services_by_name["Worker"]
    security = server_security(args, descriptor, f"worker {args.name} on {args.host}:{args.port}")
    admission = stream_limit(args, descriptor, ["Evaluate"], f"worker {args.name}")
    work = work_limit(args.max_examples_per_round)
    slowdown = slowdown_factor(args.slowdown)
    state_dir = scaffold.state_dir(args.state_dir, args.name)
    devices.set_threads(args.threads)
    device = devices.resolve_device(args.device)
    stream.check_chunk_size(args.chunk_bytes)
    task = task_from_args(args, device)
    # A SCAFFOLD round's weights carry the server's control variate beside the model.
    payload_limit = max_payload_bytes(args, task, spec_of=scaffold.train_spec)
    controls = scaffold.ControlStore(state_dir, task.model_name)
    partition = partition_from_flags(args.labels, args.shard, args.dirichlet, args.partition_seed, len(task.classes))
    data = task.load("train", partition)
    print(task.describe("train", data, args.name), flush=True)
    label = devices.describe(device)
    log.info("worker=%s device=%s task=%s model=%s partition=%s max_payload_bytes=%d state_dir=%s", args.name, label,
             task.name, task.model_name, partition.describe(), payload_limit, controls.folder)
    if slowdown != 1.0:
        log.warning("emulating a board %gx slower: %s %g", slowdown, SLOWDOWN_SETTING, slowdown)
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="torch")
    telemetry = start_telemetry(args)
    service = WorkerService(
        args.name, task, data, device_label=label, executor=executor, chunk_bytes=args.chunk_bytes,
        max_payload_bytes=payload_limit, receive_timeout=args.receive_timeout, telemetry=telemetry,
        max_examples_per_round=work, slowdown=slowdown, control_store=controls,
        ledger=privacy.Ledger(state_dir),
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
    args = parse_args(argv)
    # Before any thread of the service starts: its turns then share one C heap (jetfed.allocator).
    allocator.limit_arenas()
    return run_service(serve, args)
