"""Telemetry and RpcMetricsInterceptor against a real grpc.aio server and a real /metrics
endpoint: every handler kind, calls that end OK, aborted, failed and cancelled."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, AsyncIterator, Dict, FrozenSet, Tuple

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from prometheus_client.parser import text_string_to_metric_families

from coordinator.clients import Weights
from coordinator.runner import run
from coordinator.settings import RunSettings
from jetfed import serving, stream
from jetfed.config import TrainConfig
from jetfed.data import LabeledImages, load_mnist
from jetfed.models import build_model
from jetfed.telemetry import RpcMetricsInterceptor, RunTelemetry, Telemetry
from jetfed.training import DeviceData
from jetfed.v1 import worker_pb2, worker_pb2_grpc
from tests.integration.services import evaluator_server, mnist_task
from worker.service import WorkerService

ECHO = "jetfed.test.Echo"
HEALTH = "grpc.health.v1.Health"
Samples = Dict[Tuple[str, FrozenSet[Tuple[str, str]]], float]


async def chat(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
    async for message in requests:
        if message == b"bad":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "bad is not a message")
        yield message


async def total(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> bytes:
    return str(sum([len(message) async for message in requests])).encode()


async def repeat(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
    for _ in range(3):
        yield request


def shout(request: bytes, context: Any) -> bytes:
    """Sync: grpc.aio runs it in a thread, with a context that has no code()."""
    return request.upper()


async def missing(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    context.set_code(grpc.StatusCode.NOT_FOUND)
    context.set_details("no such thing")
    return b""


async def crash(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    raise RuntimeError("a bug in the servicer")


ECHO_HANDLERS = {
    "Chat": grpc.stream_stream_rpc_method_handler(chat),
    "Total": grpc.stream_unary_rpc_method_handler(total),
    "Repeat": grpc.unary_stream_rpc_method_handler(repeat),
    "Shout": grpc.unary_unary_rpc_method_handler(shout),
    "Missing": grpc.unary_unary_rpc_method_handler(missing),
    "Crash": grpc.unary_unary_rpc_method_handler(crash),
}


def method(name: str) -> str:
    return f"/{ECHO}/{name}"


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text) for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def rpcs(samples: Samples, service: str, method: str, code: str) -> float:
    return value(samples, "jetfed_rpcs_total", service=service, method=method, code=code)


async def calls_of_every_kind(telemetry: Telemetry, metrics_port: int) -> Samples:
    server = grpc.aio.server(interceptors=[RpcMetricsInterceptor(telemetry)])
    health_pb2_grpc.add_HealthServicer_to_server(health_aio.HealthServicer(), server)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(ECHO, ECHO_HANDLERS),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await health.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=5)
            assert refused.value.code() == grpc.StatusCode.NOT_FOUND

            chat_call = channel.stream_stream(method("Chat"))
            assert [m async for m in chat_call(iter([b"a", b"b"]), timeout=5)] == [b"a", b"b"]
            with pytest.raises(grpc.aio.AioRpcError) as aborted:
                async for _ in chat_call(iter([b"a", b"bad"]), timeout=5):
                    pass
            assert aborted.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert await channel.stream_unary(method("Total"))(iter([b"ab", b"c"]), timeout=5) == b"3"
            assert [m async for m in channel.unary_stream(method("Repeat"))(b"x", timeout=5)] == [b"x"] * 3
            assert await channel.unary_unary(method("Shout"))(b"hi", timeout=5) == b"HI"
            for name, code in (("Missing", grpc.StatusCode.NOT_FOUND), ("Crash", grpc.StatusCode.UNKNOWN),
                               ("Nope", grpc.StatusCode.UNIMPLEMENTED)):
                with pytest.raises(grpc.aio.AioRpcError) as failed:
                    await channel.unary_unary(method(name))(b"", timeout=5)
                assert failed.value.code() == code

            watch = health.Watch(health_pb2.HealthCheckRequest(service=""))
            assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
            watch.cancel()
        # The server learns of the cancellation asynchronously.
        deadline = time.monotonic() + 5
        samples = scrape(metrics_port)
        while not rpcs(samples, HEALTH, "Watch", "CANCELLED") and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            samples = scrape(metrics_port)
        return samples
    finally:
        await server.stop(None)


def test_every_handler_kind_is_counted_by_its_final_status() -> None:
    telemetry = Telemetry()
    port = telemetry.start_http("127.0.0.1", 0)
    try:
        samples = asyncio.run(calls_of_every_kind(telemetry, port))
    finally:
        telemetry.stop_http()

    assert rpcs(samples, HEALTH, "Check", "OK") == 1
    assert rpcs(samples, HEALTH, "Check", "NOT_FOUND") == 1
    assert rpcs(samples, HEALTH, "Watch", "CANCELLED") == 1
    assert rpcs(samples, ECHO, "Chat", "OK") == 1
    assert rpcs(samples, ECHO, "Chat", "INVALID_ARGUMENT") == 1
    for name, code in (("Total", "OK"), ("Repeat", "OK"), ("Shout", "OK"), ("Missing", "NOT_FOUND"),
                       ("Crash", "UNKNOWN")):
        assert rpcs(samples, ECHO, name, code) == 1, (name, code)
    assert value(samples, "jetfed_rpc_seconds_count", service=ECHO, method="Chat") == 2
    assert value(samples, "jetfed_rpc_seconds_count", service=HEALTH, method="Check") == 2
    assert 0 < value(samples, "jetfed_rpc_seconds_sum", service=ECHO, method="Chat") < 5

    errors = {dict(labels)["method"] + ":" + dict(labels)["code"]: count
              for (name, labels), count in samples.items() if name == "jetfed_errors_total"}
    assert errors == {"Check:NOT_FOUND": 1, "Chat:INVALID_ARGUMENT": 1, "Missing:NOT_FOUND": 1,
                      "Crash:UNKNOWN": 1, "Watch:CANCELLED": 1}
    assert not [labels for (name, labels), _ in samples.items()
                if name == "jetfed_rpcs_total" and ("method", "Nope") in labels], "unknown methods mint no series"


def test_weights_and_rounds_reach_the_endpoint_of_their_own_registry() -> None:
    telemetry, other = RunTelemetry(), Telemetry()
    telemetry.add_bytes_received("Train", 1000)
    telemetry.on_bytes_received("Train")(24)
    telemetry.add_bytes_sent("Evaluate", 7)
    telemetry.on_bytes_sent("Train")(5)
    telemetry.observe_round(1.5, "completed")
    telemetry.observe_round(0.5, "failed")
    telemetry.observe_train("alice", 0.25)
    telemetry.observe_evaluate("global", 0.125)
    telemetry.set_workers_contributing(3)
    telemetry.set_round(7)
    with pytest.raises(ValueError, match="outcome"):
        telemetry.observe_round(1.0, "aborted")
    other.add_bytes_received("Train", 1)

    port, other_port = telemetry.start_http("127.0.0.1", 0), other.start_http("127.0.0.1", 0)
    try:
        samples, other_samples = scrape(port), scrape(other_port)
    finally:
        telemetry.stop_http()
        other.stop_http()

    assert port != other_port
    assert value(samples, "jetfed_weight_bytes_received_total", method="Train") == 1024
    assert value(samples, "jetfed_weight_bytes_sent_total", method="Evaluate") == 7
    assert value(samples, "jetfed_weight_bytes_sent_total", method="Train") == 5
    assert value(samples, "jetfed_rounds_total", outcome="completed") == 1
    assert value(samples, "jetfed_rounds_total", outcome="failed") == 1
    assert value(samples, "jetfed_round_seconds_count") == 2
    assert value(samples, "jetfed_round_seconds_sum") == 2.0
    assert value(samples, "jetfed_train_seconds_count", worker="alice") == 1
    assert value(samples, "jetfed_train_seconds_bucket", worker="alice", le="0.25") == 1
    assert value(samples, "jetfed_evaluate_seconds_sum", model="global") == 0.125
    assert value(samples, "jetfed_workers_contributing") == 3
    assert value(samples, "jetfed_current_round") == 7
    assert value(other_samples, "jetfed_weight_bytes_received_total", method="Train") == 1
    assert not [name for name, _ in other_samples if "round" in name], "a service's scrape shows no run metrics"


async def measured_run(images: LabeledImages, out_dir: Path) -> Tuple[Samples, Samples]:
    """One round with evaluation: a worker served the way worker.cli serves it, an evaluator,
    the coordinator's run; the scrapes of the worker's and the coordinator's metrics."""
    worker_telemetry, coordinator_telemetry = Telemetry(), RunTelemetry()
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="torch")
    service = WorkerService("alice", mnist_task(), DeviceData.from_images(images, torch.device("cpu")),
                            device_label="cpu", executor=executor, chunk_bytes=stream.DEFAULT_CHUNK_BYTES,
                            max_payload_bytes=stream.DEFAULT_MAX_PAYLOAD_BYTES, telemetry=worker_telemetry)
    name = worker_pb2.DESCRIPTOR.services_by_name["Worker"].full_name
    worker = await serving.start_server(
        [serving.Service(name, lambda server: worker_pb2_grpc.add_WorkerServicer_to_server(service, server))],
        "127.0.0.1", 0, interceptors=[RpcMetricsInterceptor(worker_telemetry)],
    )
    try:
        async with evaluator_server(images) as evaluator:
            settings = RunSettings(
                workers={"alice": f"127.0.0.1:{worker.port}"}, evaluator=evaluator, out_dir=out_dir, rounds=1,
                train=TrainConfig(batch_size=16, max_batches=2), connect_timeout=10.0,
            ).validated()
            await run(settings, say=lambda line: None, telemetry=coordinator_telemetry)
    finally:
        await worker.stop(0)
        executor.shutdown()
    samples = []
    for telemetry in (worker_telemetry, coordinator_telemetry):
        port = telemetry.start_http("127.0.0.1", 0)
        try:
            samples.append(scrape(port))
        finally:
            telemetry.stop_http()
    return samples[0], samples[1]


def test_a_round_is_measured_at_both_ends(tiny_mnist: Path, tmp_path: Path) -> None:
    images = load_mnist(tiny_mnist, "train", download=False)
    worker, coordinator = asyncio.run(measured_run(images, tmp_path))
    payload = len(Weights.of(build_model("mnist-cnn").state_dict(), "mnist-cnn").payload)

    assert rpcs(worker, "jetfed.v1.Worker", "Train", "OK") == 1
    assert rpcs(worker, "jetfed.v1.Worker", "GetInfo", "OK") == 1
    assert value(worker, "jetfed_weight_bytes_received_total", method="Train") == payload
    assert value(worker, "jetfed_weight_bytes_sent_total", method="Train") == payload
    assert value(coordinator, "jetfed_weight_bytes_sent_total", method="Train") == payload
    assert value(coordinator, "jetfed_weight_bytes_received_total", method="Train") == payload
    assert value(coordinator, "jetfed_weight_bytes_sent_total", method="Evaluate") == 2 * payload
    assert value(coordinator, "jetfed_rounds_total", outcome="completed") == 1
    assert value(coordinator, "jetfed_round_seconds_count") == 1
    assert value(coordinator, "jetfed_current_round") == 1
    assert value(coordinator, "jetfed_workers_contributing") == 1
    assert value(coordinator, "jetfed_train_seconds_count", worker="alice") == 1
    assert value(coordinator, "jetfed_evaluate_seconds_count", model="alice") == 1
    assert value(coordinator, "jetfed_evaluate_seconds_count", model="global") == 1

    recorded = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])["evaluation"]
    assert value(coordinator, "jetfed_evaluated_round") == 1
    for model in ("global", "alice"):
        metrics = recorded[model]["metrics"]
        assert {"loss", "accuracy", "recall/0", "recall/9"} <= set(metrics)
        for metric, expected in metrics.items():
            assert value(coordinator, "jetfed_evaluation_metric", model=model, metric=metric) == expected, metric
    assert not [name for name, _ in worker if name == "jetfed_evaluation_metric"], "a worker's scrape shows none"
