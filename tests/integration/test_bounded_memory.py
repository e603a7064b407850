"""Hostile weight streams against a real worker and evaluator process, started with
their default limits: every one is refused at its header, before a chunk is buffered,
with a precise status whose details stay a few hundred bytes.

A stream refused for its size, its tensor count, a garbage message or the concurrency
limit hears so at once, while it holds the call open. A stream whose header fails the manifest checks is read to its
end and discarded (so a client still writing gets the real status, grpc/grpc#36066):
those tests send the header and the real payload, then close, and the evaluator's
byte counter shows that no chunk was taken in."""

from __future__ import annotations

import asyncio
import time
import urllib.request
from pathlib import Path
from typing import AsyncIterator, Iterator, List, Optional, Tuple

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from jetfed import codec, scaffold, stream, wire
from jetfed.config import TrainConfig
from jetfed.models import build_model
from jetfed.status import MAX_DETAILS_BYTES
from jetfed.v1 import evaluation_pb2, weights_pb2, worker_pb2
from tests.conftest import free_port
from tests.integration.processes import START_TIMEOUT_S, Process, start, stop, wait_serving

Code = grpc.StatusCode
EVALUATOR = "/jetfed.v1.Evaluator/Evaluate"
TRAIN = "/jetfed.v1.Worker/Train"
WORKER_EVALUATE = "/jetfed.v1.Worker/Evaluate"
METHODS = [EVALUATOR, TRAIN, WORKER_EVALUATE]
HOSTILE_TOTAL = 400_000_000
WAIT_S = 10.0


@pytest.fixture(scope="module")
def services(tiny_mnist: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tuple[Process, Process, int]]:
    """(evaluator, worker, the evaluator's metrics port), both with default limits."""
    logs = tmp_path_factory.mktemp("bounded-memory-logs")
    common = ["--data-dir", str(tiny_mnist), "--no-download", "--threads", "1"]
    metrics_port = free_port()
    started = [
        start("testing", ["evaluator", *common, "--metrics-port", str(metrics_port)], logs),
        start("alice", ["worker", "--name", "alice", "--labels", "0-3", *common], logs),
    ]
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        for process in started:
            wait_serving(process, deadline)
        yield started[0], started[1], metrics_port
    finally:
        codes = stop(started)
    assert all(code == 0 for code in codes.values()), codes


def address(services: Tuple[Process, Process, int], method: str) -> str:
    evaluator, worker, _ = services
    return evaluator.address if method == EVALUATOR else worker.address


def real_weights() -> Tuple[weights_pb2.WeightManifest, bytes]:
    manifest, payload = codec.encode(build_model("mnist-cnn").state_dict(), "mnist-cnn")
    return wire.manifest_to_proto(manifest), payload


def header(method: str, manifest: weights_pb2.WeightManifest) -> bytes:
    if method == TRAIN:
        head = worker_pb2.TrainHeader(round=1, config=wire.config_to_proto(TrainConfig()), manifest=manifest)
        return worker_pb2.TrainRequest(header=head).SerializeToString()
    return evaluation_pb2.EvaluateRequest(header=evaluation_pb2.EvaluateHeader(manifest=manifest)).SerializeToString()


def chunk(method: str, offset: int, data: bytes) -> bytes:
    piece = weights_pb2.WeightChunk(offset=offset, data=data)
    request = worker_pb2.TrainRequest(chunk=piece) if method == TRAIN else evaluation_pb2.EvaluateRequest(chunk=piece)
    return request.SerializeToString()


async def ended_call(
    target: str, method: str, messages: List[bytes], release: Optional[asyncio.Event] = None,
) -> grpc.aio.AioRpcError:
    """Send raw `messages` to `method`, then hold the stream open until `release` (or the
    call ends), or close it at once without one; how the call ended (OK fails the test)."""
    async def requests() -> AsyncIterator[bytes]:
        for message in messages:
            yield message
        if release is not None:
            await release.wait()

    async with grpc.aio.insecure_channel(target) as channel:
        try:
            if method == TRAIN:
                async for _ in channel.stream_stream(method)(requests(), timeout=WAIT_S):
                    pass
            else:
                await channel.stream_unary(method)(requests(), timeout=WAIT_S)
        except grpc.aio.AioRpcError as ended:
            return ended
    pytest.fail(f"{method} accepted a hostile stream")


def refused_while_open(target: str, method: str, messages: List[bytes]) -> grpc.aio.AioRpcError:
    async def main() -> grpc.aio.AioRpcError:
        return await ended_call(target, method, messages, asyncio.Event())
    return asyncio.run(main())


def refused_whole(services, method: str, manifest: weights_pb2.WeightManifest) -> grpc.aio.AioRpcError:
    """`manifest`'s header, the real payload, the end of the stream: refused without the
    evaluator taking in a chunk."""
    _, payload = real_weights()
    messages = [header(method, manifest), *(chunk(method, o, d) for o, d in stream.split(payload, 1 << 20))]
    read_before, _ = evaluator_counters(services[2])
    ended = asyncio.run(ended_call(address(services, method), method, messages))
    assert evaluator_counters(services[2])[0] == read_before, "a chunk of a refused stream was taken in"
    return ended


def assert_refusal(ended: grpc.aio.AioRpcError, code: Code, *fragments: str) -> None:
    assert ended.code() == code, f"{ended.code()}: {ended.details()[:300]}"
    for fragment in fragments:
        assert fragment in ended.details()
    assert len(ended.details().encode()) <= MAX_DETAILS_BYTES


@pytest.mark.parametrize("method", METHODS)
def test_total_the_tensors_cannot_fill_is_refused_at_the_header(services, method: str) -> None:
    """Within the payload limit's margin, yet no payload of these tensors has that size."""
    manifest, payload = real_weights()
    manifest.total_bytes = len(payload) + (256 << 10)
    shortest, longest = codec.payload_size_range(codec.spec_of(build_model("mnist-cnn").state_dict()))
    assert_refusal(refused_whole(services, method, manifest), Code.INVALID_ARGUMENT,
                   str(manifest.total_bytes), f"{shortest}..{longest}")


@pytest.mark.parametrize("method", METHODS)
def test_default_payload_limit_follows_the_served_model(services, method: str) -> None:
    manifest, _ = real_weights()
    manifest.total_bytes = HOSTILE_TOTAL
    state = build_model("mnist-cnn").state_dict()
    # A worker also takes SCAFFOLD rounds: the model and one control tensor per floating tensor.
    spec = scaffold.train_spec(state) if "/jetfed.v1.Worker/" in method else codec.spec_of(state)
    limit = stream.payload_limit(codec.payload_size_range(spec)[1])
    assert limit < 5 << 20, "mnist-cnn's 1.7 MB (3.4 MB with SCAFFOLD's controls) need no more"
    ended = refused_while_open(address(services, method), method, [header(method, manifest)])
    assert_refusal(ended, Code.RESOURCE_EXHAUSTED, str(HOSTILE_TOTAL), f"limit of {limit}")


@pytest.mark.parametrize("method", METHODS)
def test_manifest_padded_with_duplicates_is_refused_at_the_header(services, method: str) -> None:
    manifest, _ = real_weights()
    manifest.tensors.extend([manifest.tensors[0]] * 100_000)
    started = time.monotonic()
    ended = refused_while_open(address(services, method), method, [header(method, manifest)])
    assert_refusal(ended, Code.INVALID_ARGUMENT, "100008 listed")
    assert time.monotonic() - started < 5.0


HUGE = [
    pytest.param(lambda m: setattr(m.tensors[0], "name", "n" * 10_000), Code.FAILED_PRECONDITION, "10000 chars",
                 id="10KB-tensor-name"),
    pytest.param(lambda m: setattr(m, "sha256", "f" * 1_000_000), Code.INVALID_ARGUMENT, "1000000 characters",
                 id="1MB-sha256"),
    pytest.param(lambda m: setattr(m, "model", "m" * 1_000_000), Code.FAILED_PRECONDITION, "1000000 chars",
                 id="1MB-model-name"),
]


@pytest.mark.parametrize("method", [EVALUATOR, TRAIN])
@pytest.mark.parametrize("edit, code, fragment", HUGE)
def test_details_never_echo_unbounded_client_input(services, method: str, edit, code: Code, fragment: str) -> None:
    manifest, _ = real_weights()
    edit(manifest)
    assert_refusal(refused_whole(services, method, manifest), code, fragment)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("after_header", [False, True], ids=["first", "after-header"])
def test_garbage_protobuf_is_invalid_argument(services, method: str, after_header: bool) -> None:
    manifest, _ = real_weights()
    messages = [header(method, manifest)] if after_header else []
    ended = refused_while_open(address(services, method), method, [*messages, b"\xff\xff\xff\xff"])
    assert_refusal(ended, Code.INVALID_ARGUMENT, f"message {len(messages) + 1} is not valid protobuf")


@pytest.mark.parametrize("method, limit", [(EVALUATOR, 8), (WORKER_EVALUATE, 2)])
def test_streams_beyond_the_limit_are_refused_at_once(services, method: str, limit: int) -> None:
    """`limit` streams wait for their chunks; one more is refused at once, not queued,
    and a slot freed serves the next caller."""
    manifest, payload = real_weights()
    target = address(services, method)

    async def main() -> None:
        release = asyncio.Event()
        held = [asyncio.ensure_future(ended_call(target, method, [header(method, manifest)], release))
                for _ in range(limit)]
        await asyncio.sleep(1.0)
        assert not any(call.done() for call in held), "a stream within the limit was refused"
        started = time.monotonic()
        ended = await ended_call(target, method, [header(method, manifest)], asyncio.Event())
        assert time.monotonic() - started < 2.0
        assert_refusal(ended, Code.RESOURCE_EXHAUSTED, f"--max-concurrent-streams {limit}")
        release.set()
        await asyncio.gather(*held)
        whole = [header(method, manifest), *(chunk(method, o, d) for o, d in stream.split(payload, 1 << 20))]
        async with grpc.aio.insecure_channel(target) as channel:
            reply = evaluation_pb2.EvaluateResponse.FromString(await channel.stream_unary(method)(iter(whole), timeout=60))
        assert reply.total > 0
    asyncio.run(main())


def evaluator_counters(metrics_port: int) -> Tuple[float, float]:
    """(Evaluate chunk bytes read, Evaluate calls ended RESOURCE_EXHAUSTED) so far."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as response:
        text = response.read().decode()
    read = exhausted = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels.get("method") != "Evaluate":
                continue
            if sample.name == "jetfed_weight_bytes_received_total":
                read += sample.value
            if sample.name == "jetfed_rpcs_total" and sample.labels.get("code") == "RESOURCE_EXHAUSTED":
                exhausted += sample.value
    return read, exhausted


def peak_rss_kib(process: Process) -> int:
    status = Path(f"/proc/{process.popen.pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:")))


def test_concurrent_oversized_streams_buffer_nothing(services) -> None:
    """The issue's attack, small: four streams announce 400 MB and push chunks at once.
    Each is refused at its header: the evaluator reads none of their chunks and its peak
    memory stays put (bench/hostile_memory.py measures the full-size attack)."""
    evaluator, _, metrics_port = services
    manifest, _ = real_weights()
    manifest.total_bytes = HOSTILE_TOTAL
    messages = [header(EVALUATOR, manifest), *(chunk(EVALUATOR, i << 20, bytes(1 << 20)) for i in range(8))]
    read_before, exhausted_before = evaluator_counters(metrics_port)
    peak_before = peak_rss_kib(evaluator)

    async def main() -> List[grpc.aio.AioRpcError]:
        return await asyncio.gather(*(ended_call(evaluator.address, EVALUATOR, messages, asyncio.Event())
                                      for _ in range(4)))
    asyncio.run(main())
    read_after, exhausted_after = evaluator_counters(metrics_port)
    assert exhausted_after - exhausted_before == 4
    assert read_after == read_before, "a chunk of a refused stream was read"
    assert peak_rss_kib(evaluator) - peak_before < 64 << 10
