"""`jetfed evaluator`: load the test set, then serve Evaluate."""

from __future__ import annotations

import argparse
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import List, Optional

from jetfed import allocator, devices
from jetfed.partitions import Partition
from jetfed.service_cli import (
    host_until_signal, max_payload_bytes, run_service, server_security, service_parser, start_telemetry, stream_limit,
    task_from_args,
)
from jetfed.scoring import Scorer
from jetfed.v1 import evaluator_pb2, evaluator_pb2_grpc
from evaluator.service import EvaluatorService

log = logging.getLogger("evaluator")


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    # The coordinator scores every update and the global model at once: room for 7 workers.
    parser = service_parser("jetfed evaluator", __doc__, default_port=8780, default_streams=8)
    parser.add_argument("--name", default="testing", help="this evaluator's name")
    parser.add_argument("--batch-size", type=int, default=500, help="evaluation batch size")
    return parser.parse_args(argv)


async def serve(args: argparse.Namespace) -> None:
    descriptor = evaluator_pb2.DESCRIPTOR.services_by_name["Evaluator"]
    security = server_security(args, descriptor, f"evaluator {args.name} on {args.host}:{args.port}")
    admission = stream_limit(args, descriptor, ["Evaluate"], f"evaluator {args.name}")
    devices.set_threads(args.threads)
    device = devices.resolve_device(args.device)
    task = task_from_args(args, device)
    payload_limit = max_payload_bytes(args, task)
    data = task.load("test", Partition())
    print(task.describe("test", data, args.name), flush=True)
    label = devices.describe(device)
    log.info("evaluator=%s device=%s task=%s model=%s max_payload_bytes=%d", args.name, label, task.name,
             task.model_name, payload_limit)
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="torch")
    telemetry = start_telemetry(args)
    scorer = Scorer(task, data, label, executor, payload_limit, args.batch_size, args.receive_timeout, telemetry)
    scorer.warm_up()
    service = EvaluatorService(args.name, scorer)
    await host_until_signal(
        args, descriptor, lambda server: evaluator_pb2_grpc.add_EvaluatorServicer_to_server(service, server),
        security, executor, telemetry, admission,
    )


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    # Before any thread of the service starts: one C heap, and each batch's activations
    # reuse the last one's pages rather than fault fresh ones in (jetfed.allocator).
    allocator.limit_arenas()
    allocator.keep_freed_heap()
    return run_service(serve, args)
