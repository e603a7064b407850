"""Flags and the process entry shared by the services that hold data (worker and
evaluator), so both read and fail the same way."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from concurrent.futures import Executor
from typing import Any, Callable, Coroutine, List, Optional, Tuple

import grpc
import torch
from google.protobuf.descriptor import ServiceDescriptor

from jetfed import codec, logs, readiness, serving, stream, tls
from jetfed.admission import SETTING as STREAMS_SETTING
from jetfed.admission import ConcurrencyLimit
from jetfed.auth import CallerAuthorization, add_token_argument, read_token, service_methods
from jetfed.errors import InvalidConfig, JetfedError
from jetfed.data import resolve_data_dir
from jetfed.models import model_names
from jetfed.tasks import DEFAULT_TASK, Task, TaskSettings, build_task, installed
from jetfed.tasks.base import parse_option_flags
from jetfed.telemetry import RpcMetricsInterceptor, Telemetry


def service_parser(prog: str, description: str, default_port: int, default_streams: int) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--host", default="0.0.0.0", help="address to bind (default: all interfaces)")
    parser.add_argument("--port", type=int, default=default_port, help=f"port to bind (default {default_port}); 0 picks a free one")
    add_task_arguments(parser)
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    parser.add_argument("--threads", type=int, help="torch CPU threads (give co-located services a fair share)")
    parser.add_argument(
        "--max-payload-bytes", type=int,
        help="largest weight stream accepted (default: the largest the served model needs plus 10%% and 1 MiB; on a "
             "worker, a SCAFFOLD round's: the model and its control variate)",
    )
    parser.add_argument(
        STREAMS_SETTING, type=int, default=default_streams,
        help=f"weight streams received at once; more are refused with RESOURCE_EXHAUSTED (default {default_streams})",
    )
    parser.add_argument(
        "--receive-timeout", type=float, default=120.0,
        help="seconds a client may take to stream a model before the call is dropped",
    )
    parser.add_argument("--grace", type=float, default=5.0, help="seconds RPCs in flight get on shutdown")
    parser.add_argument(
        "--metrics-port", type=int,
        help="serve Prometheus metrics on --host at this port, path /metrics (default: none); 0 picks a free one",
    )
    parser.add_argument("--log-level", default="INFO")
    tls.add_tls_arguments(parser)
    add_token_argument(parser)
    return parser


def add_task_arguments(parser: argparse.ArgumentParser) -> None:
    """--task, --model, --option and the data flags: what this board runs, on what."""
    add_task_choice_arguments(parser)
    parser.add_argument("--data-dir", help="the task's data folder (default: $JETFED_DATA_DIR, else ./data)")
    parser.add_argument("--no-download", action="store_true", help="never download data (mnist: torchvision's)")


def add_task_choice_arguments(parser: argparse.ArgumentParser, model_default: str = "the task's own") -> None:
    """--task, --model and --option alone: which task and model, for a command that
    builds the model without serving data (`jetfed export`, whose default model is the
    one its weights file names)."""
    names = ", ".join(installed())
    parser.add_argument(
        "--task", default=DEFAULT_TASK,
        help=f"the task this service runs (default {DEFAULT_TASK}): an installed one ({names}) or a Task class as "
             "package.module:attr; `jetfed tasks` lists them with their options",
    )
    parser.add_argument(
        "--model", help=f"the task's model (default: {model_default}): one of jetfed's ({', '.join(model_names())}) "
                        "or a torchvision classification model, e.g. resnet50",
    )
    parser.add_argument(
        "--option", action="append", default=[], metavar="NAME=VALUE",
        help="a task option, repeatable, e.g. --option image_size=64 (`jetfed tasks` lists each task's)",
    )


def task_from_args(args: argparse.Namespace, device: torch.device) -> Task:
    """The task the flags name, built for `device`, its options checked."""
    settings = TaskSettings(
        data_dir=resolve_data_dir(args.data_dir), device=device, model=args.model,
        options=parse_option_flags(args.option), download=not args.no_download,
    )
    return build_task(args.task, settings)


def server_security(
    args: argparse.Namespace, service: ServiceDescriptor, what: str,
) -> Tuple[Optional[grpc.ServerCredentials], List[grpc.aio.ServerInterceptor]]:
    """TLS credentials and the caller check from the shared flags, validated before any
    data loads. Every method but GetInfo belongs to the coordinator; with neither TLS
    nor a token nobody can prove anything, so the service stays open (and says so)."""
    files = tls.TlsFiles.from_flags(args.tls_cert, args.tls_key, args.tls_ca)
    token = read_token(args.token_file)
    if files is None:
        tls.warn_plaintext(logging.getLogger(__name__), what, args.host)
        if token is None:
            return None, []
    guard = CallerAuthorization(service_methods(service), {"coordinator"}, token)
    return (files.server_credentials() if files else None), [guard]


def max_payload_bytes(
    args: argparse.Namespace, task: Task, spec_of: Callable[[codec.StateDict], Tuple[codec.TensorInfo, ...]] = codec.spec_of,
) -> int:
    """--max-payload-bytes, or by default what the served model needs (stream.payload_limit
    of the largest encoding of its tensors): a limit that follows the model never lets a
    stream buffer hundreds of megabytes for a model of two. `spec_of` gives the tensors
    the largest stream carries for the model's state_dict (a worker's: the model and
    SCAFFOLD's control variate); a stream is still held to its own manifest's size."""
    if args.max_payload_bytes is None:
        spec = spec_of(task.build_model().state_dict())
        return stream.payload_limit(codec.payload_size_range(spec)[1])
    if args.max_payload_bytes < 1:
        raise InvalidConfig(f"--max-payload-bytes: {args.max_payload_bytes} must be at least 1")
    return args.max_payload_bytes


def stream_limit(args: argparse.Namespace, service: ServiceDescriptor, methods: List[str], who: str) -> ConcurrencyLimit:
    """The --max-concurrent-streams guard over `methods` (short names) of `service`."""
    return ConcurrencyLimit([f"/{service.full_name}/{m}" for m in methods], args.max_concurrent_streams, who)


def start_telemetry(args: argparse.Namespace) -> Telemetry:
    """The service's metrics, always recorded; scrapeable only when --metrics-port is given."""
    telemetry = Telemetry()
    if args.metrics_port is not None:
        port = telemetry.start_http(args.host, args.metrics_port)
        logging.getLogger(__name__).info("metrics on http://%s:%d/metrics", args.host, port)
    return telemetry


async def host_until_signal(
    args: argparse.Namespace, descriptor: ServiceDescriptor, add_servicer: Callable[[grpc.aio.Server], None],
    security: Tuple[Optional[grpc.ServerCredentials], List[grpc.aio.ServerInterceptor]], executor: Executor,
    telemetry: Telemetry, admission: ConcurrencyLimit,
    on_started: Callable[[serving.RunningServer], None] = lambda running: None,
) -> None:
    """Serve one service (with health and reflection) until SIGTERM/SIGINT, then let the
    torch thread go. systemd hears READY=1 once the port serves (Type=notify units).
    Metrics come first among the interceptors, so refused calls count; admission comes
    before the caller check, so a guarded client hears it was admitted (jetfed.auth's
    ADMITTED) only once both let it in, and starts writing only then. `on_started`
    gets the running server, e.g. for a servicer whose health follows its state."""
    credentials, interceptors = security
    running = await serving.start_server(
        [serving.Service(descriptor.full_name, add_servicer)], args.host, args.port, credentials,
        [RpcMetricsInterceptor(telemetry), admission, *interceptors],
    )
    on_started(running)
    readiness.notify("READY=1")
    try:
        await serving.serve_until_signal(running, args.grace)
    finally:
        executor.shutdown(wait=False)
        telemetry.stop_http()


def run_service(serve: Callable[[argparse.Namespace], Coroutine[Any, Any, None]], args: argparse.Namespace) -> int:
    """Run until a signal stops the service; a start-up fault exits 2 with one clear line.

    After a stop the process ends at once: RPCs have had their --grace, training has
    stopped and the logs are flushed, so nothing is left to finalize, while the
    interpreter's teardown of torch and gRPC would take another 1-2 s and break the
    promise that SIGTERM exits within --grace (systemd's stop timeout counts on it)."""
    logs.configure(args.log_level)
    try:
        asyncio.run(serve(args))
    except JetfedError as exc:
        logging.getLogger(serve.__module__).error("%s", exc)
        return 2
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
