"""Real grpc.aio servers on free ports, real TLS handshakes: who gets in, and with
which status code the others are turned away."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
from pathlib import Path
from typing import AsyncIterator, Dict, List, Optional, Tuple

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from jetfed import certs, tls
from jetfed.auth import CallerAuthorization, await_admission, bearer_metadata, read_token, service_methods
from jetfed.errors import InvalidConfig
from jetfed.v1 import info_pb2, worker_pb2, worker_pb2_grpc

TOKEN = "s3cret-token-for-the-tests"
WORKER_SERVICE = worker_pb2.DESCRIPTOR.services_by_name["Worker"]
ECHO = "jetfed.test.Echo"
# One method per handler kind gRPC tells apart: yielding, writing, or returning.
ECHO_KINDS = ["UnaryUnary", "UnaryStream", "UnaryStreamWrite", "StreamUnary", "StreamStream", "StreamStreamWrite"]
PROTECTED = service_methods(WORKER_SERVICE) | {f"/{ECHO}/{kind}" for kind in ECHO_KINDS}
TIMEOUT = 10.0


class Worker(worker_pb2_grpc.WorkerServicer):
    async def GetInfo(self, request, context):
        return info_pb2.GetInfoResponse(name="alice", role="worker")

    async def Train(self, request_iterator, context):
        async for _ in request_iterator:
            pass
        yield worker_pb2.TrainResponse(result=worker_pb2.TrainResult(round=1, worker="alice"))

    async def EndRun(self, request, context):
        return worker_pb2.EndRunResponse(released=True)


def echo_handler(ran: List[str]) -> grpc.GenericRpcHandler:
    """Raw-bytes methods of every kind; `ran` records which ones were let through."""

    async def unary_unary(request, context):
        ran.append("UnaryUnary")
        return request

    async def unary_stream(request, context):
        ran.append("UnaryStream")
        yield request

    async def unary_stream_write(request, context):
        ran.append("UnaryStreamWrite")
        await context.write(request)

    async def stream_unary(requests, context):
        ran.append("StreamUnary")
        return b"".join([r async for r in requests])

    async def stream_stream(requests, context):
        ran.append("StreamStream")
        async for request in requests:
            yield request

    async def stream_stream_write(requests, context):
        ran.append("StreamStreamWrite")
        async for request in requests:
            await context.write(request)

    return grpc.method_handlers_generic_handler(ECHO, {
        "UnaryUnary": grpc.unary_unary_rpc_method_handler(unary_unary),
        "UnaryStream": grpc.unary_stream_rpc_method_handler(unary_stream),
        "UnaryStreamWrite": grpc.unary_stream_rpc_method_handler(unary_stream_write),
        "StreamUnary": grpc.stream_unary_rpc_method_handler(stream_unary),
        "StreamStream": grpc.stream_stream_rpc_method_handler(stream_stream),
        "StreamStreamWrite": grpc.stream_stream_rpc_method_handler(stream_stream_write),
    })


@contextlib.asynccontextmanager
async def server(credentials: Optional[grpc.ServerCredentials], token: Optional[str] = None) -> AsyncIterator[Tuple[str, List[str]]]:
    """A worker-like server on a free port: Worker (Train protected), health, and Echo."""
    ran: List[str] = []
    srv = grpc.aio.server(interceptors=[CallerAuthorization(PROTECTED, {"coordinator"}, token)])
    worker_pb2_grpc.add_WorkerServicer_to_server(Worker(), srv)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, srv)
    srv.add_generic_rpc_handlers([echo_handler(ran)])
    port = srv.add_secure_port("127.0.0.1:0", credentials) if credentials else srv.add_insecure_port("127.0.0.1:0")
    await srv.start()
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    try:
        yield f"127.0.0.1:{port}", ran
    finally:
        await srv.stop(None)


def channel(address: str, credentials: Optional[grpc.ChannelCredentials]) -> grpc.aio.Channel:
    return grpc.aio.secure_channel(address, credentials) if credentials else grpc.aio.insecure_channel(address)


async def train(address: str, credentials: Optional[grpc.ChannelCredentials], metadata=()):
    """Call Train the way a coordinator should: stream only once admitted."""
    async with channel(address, credentials) as ch:
        call = worker_pb2_grpc.WorkerStub(ch).Train(timeout=TIMEOUT, metadata=metadata)
        await await_admission(call)
        await call.write(worker_pb2.TrainRequest(header=worker_pb2.TrainHeader(round=1)))
        await call.done_writing()
        return [r async for r in call][0]


# A refused echo sends no request messages: a grpc.aio client whose write is in flight
# when the server's status arrives may report INTERNAL instead (grpc/grpc#36066).
async def echo(address: str, credentials: grpc.ChannelCredentials, kind: str, send: bool = True) -> bytes:
    async with channel(address, credentials) as ch:
        method = f"/{ECHO}/{kind}"
        requests = iter([b"h", b"i"]) if send else None
        if kind == "UnaryUnary":
            return await ch.unary_unary(method)(b"hi", timeout=TIMEOUT)
        if kind.startswith("UnaryStream"):
            return b"".join([r async for r in ch.unary_stream(method)(b"hi", timeout=TIMEOUT)])
        if kind == "StreamUnary":
            return await ch.stream_unary(method)(requests, timeout=TIMEOUT)
        return b"".join([r async for r in ch.stream_stream(method)(requests, timeout=TIMEOUT)])


def status_of(coroutine) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        asyncio.run(coroutine)
    return raised.value.code()


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fed")
    certs.provision(out, "coord", {"alice": ["alice.local"]}, ("testing", []))
    return out


@pytest.fixture(scope="module")
def rogue(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second federation using the same names: its certificates must not open ours."""
    out = tmp_path_factory.mktemp("rogue")
    certs.provision(out, "coord", {"alice": []})
    return out


def files(fed: Path, node: str) -> tls.TlsFiles:
    return tls.TlsFiles.from_flags(str(fed / node / f"{node}.crt"), str(fed / node / f"{node}.key"), str(fed / node / "ca.crt"))


def mtls(fed: Path) -> grpc.ServerCredentials:
    return files(fed, "alice").server_credentials()


def as_node(fed: Path, node: str) -> grpc.ChannelCredentials:
    return files(fed, node).channel_credentials()


def test_the_coordinator_may_train_over_mutual_tls(fed: Path):
    async def scenario():
        async with server(mtls(fed)) as (address, _):
            return await train(address, as_node(fed, "coord"))

    assert asyncio.run(scenario()).result.worker == "alice"


@pytest.mark.parametrize("kind", ECHO_KINDS)
def test_every_handler_kind_is_guarded(fed: Path, kind: str):
    async def scenario():
        async with server(mtls(fed)) as (address, ran):
            allowed = await echo(address, as_node(fed, "coord"), kind)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await echo(address, as_node(fed, "testing"), kind, send=False)
            return allowed, refused.value.code(), ran

    allowed, refused, ran = asyncio.run(scenario())
    assert allowed == b"hi"
    assert refused == grpc.StatusCode.PERMISSION_DENIED
    assert ran == [kind]


async def upload(address: str, credentials: grpc.ChannelCredentials, chunks: List[bytes]):
    """Stream `chunks` only once the server has admitted the call: a refusal then arrives
    before any write, with its own status code."""
    async with channel(address, credentials) as ch:
        call = ch.stream_unary(f"/{ECHO}/StreamUnary")(timeout=TIMEOUT)
        try:
            await await_admission(call)
        except grpc.aio.AioRpcError as refused:
            return refused.code()
        for chunk in chunks:
            await call.write(chunk)
        await call.done_writing()
        return len(await call)


@pytest.mark.parametrize("node,expected", [("coord", 2 * 1024 * 1024), ("testing", grpc.StatusCode.PERMISSION_DENIED)])
def test_a_client_learns_its_admission_before_uploading(fed: Path, node: str, expected):
    async def scenario():
        async with server(mtls(fed)) as (address, ran):
            return await upload(address, as_node(fed, node), [bytes(64 * 1024)] * 32), ran

    outcome, ran = asyncio.run(scenario())
    assert outcome == expected
    assert ran == (["StreamUnary"] if node == "coord" else [])


def test_a_worker_certificate_is_denied_and_the_refusal_logged(fed: Path, caplog):
    async def scenario():
        async with server(mtls(fed)) as (address, _):
            await train(address, as_node(fed, "alice"))

    with caplog.at_level(logging.WARNING, logger="jetfed.auth"):
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            asyncio.run(scenario())
    assert raised.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "role worker" in raised.value.details()
    assert any("rpc=/jetfed.v1.Worker/Train" in r.message and "status=PERMISSION_DENIED role=worker" in r.message
               for r in caplog.records)


def test_unprotected_methods_serve_any_federation_member(fed: Path):
    async def scenario():
        async with server(mtls(fed)) as (address, _):
            async with channel(address, as_node(fed, "alice")) as ch:
                health = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT)
                info = await worker_pb2_grpc.WorkerStub(ch).GetInfo(info_pb2.GetInfoRequest(), timeout=TIMEOUT)
                return health.status, info.name

    assert asyncio.run(scenario()) == (health_pb2.HealthCheckResponse.SERVING, "alice")


@pytest.mark.parametrize("client", ["plaintext", "no certificate", "another CA"])
def test_the_handshake_turns_away_strangers(fed: Path, rogue: Path, client: str):
    credentials = {
        "plaintext": None,
        "no certificate": tls.channel_credentials(fed / "ca.crt"),
        "another CA": grpc.ssl_channel_credentials(
            (fed / "ca.crt").read_bytes(), (rogue / "coord" / "coord.key").read_bytes(), (rogue / "coord" / "coord.crt").read_bytes()
        ),
    }[client]

    async def scenario():
        async with server(mtls(fed)) as (address, ran):
            try:
                await train(address, credentials)
            finally:
                assert ran == []

    assert status_of(scenario()) == grpc.StatusCode.UNAVAILABLE


def test_a_client_trusting_another_ca_refuses_the_server(fed: Path, rogue: Path):
    async def scenario():
        async with server(mtls(fed)) as (address, _):
            await train(address, as_node(rogue, "coord"))

    assert status_of(scenario()) == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("metadata,expected", [
    (bearer_metadata(TOKEN), None),
    ((("authorization", f"bearer {TOKEN}"),), None),
    ((), grpc.StatusCode.UNAUTHENTICATED),
    (bearer_metadata(TOKEN + "x"), grpc.StatusCode.UNAUTHENTICATED),
    ((("authorization", TOKEN),), grpc.StatusCode.UNAUTHENTICATED),
])
def test_without_tls_the_token_decides(metadata: tuple, expected: Optional[grpc.StatusCode]):
    async def scenario():
        async with server(None, TOKEN) as (address, ran):
            try:
                return await train(address, None, metadata)
            finally:
                assert ran == []

    if expected is None:
        assert asyncio.run(scenario()).result.worker == "alice"
    else:
        assert status_of(scenario()) == expected


def test_without_tls_or_token_protected_methods_stay_shut():
    async def scenario():
        async with server(None, None) as (address, _):
            await train(address, None, bearer_metadata(TOKEN))

    assert status_of(scenario()) == grpc.StatusCode.UNAUTHENTICATED


def test_server_only_tls_falls_back_to_the_token(fed: Path):
    alice = files(fed, "alice")
    credentials = tls.server_credentials(alice.cert, alice.key, ca=None)
    client = tls.channel_credentials(fed / "ca.crt")

    async def scenario(metadata):
        async with server(credentials, TOKEN) as (address, _):
            return await train(address, client, metadata)

    assert asyncio.run(scenario(bearer_metadata(TOKEN))).result.worker == "alice"
    assert status_of(scenario(())) == grpc.StatusCode.UNAUTHENTICATED


def test_a_sync_behaviour_on_a_protected_method_fails_closed():
    ran: List[str] = []

    def sync_unary(request, context):
        ran.append("sync")
        return request

    async def scenario():
        srv = grpc.aio.server(interceptors=[CallerAuthorization({f"/{ECHO}/Sync"}, {"coordinator"}, TOKEN)])
        srv.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(ECHO, {
            "Sync": grpc.unary_unary_rpc_method_handler(sync_unary)})])
        port = srv.add_insecure_port("127.0.0.1:0")
        await srv.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                await ch.unary_unary(f"/{ECHO}/Sync")(b"hi", timeout=TIMEOUT, metadata=bearer_metadata(TOKEN))
        finally:
            await srv.stop(None)

    assert status_of(scenario()) == grpc.StatusCode.UNKNOWN
    assert ran == []


def test_protected_names_are_checked():
    with pytest.raises(ValueError, match="/package.Service/Method"):
        CallerAuthorization({"jetfed.v1.Worker/Train"}, {"coordinator"})
    with pytest.raises(ValueError, match="empty token"):
        CallerAuthorization(PROTECTED, {"coordinator"}, "")
    assert service_methods(WORKER_SERVICE) == {
        "/jetfed.v1.Worker/Train", "/jetfed.v1.Worker/Evaluate", "/jetfed.v1.Worker/EndRun",
        "/jetfed.v1.Worker/InitialWeights", "/jetfed.v1.Worker/SecAggAdvertise",
        "/jetfed.v1.Worker/SecAggShareKeys", "/jetfed.v1.Worker/SecAggUnmask",
    }


@pytest.mark.parametrize("node,expected", [("coord", True), ("alice", grpc.StatusCode.PERMISSION_DENIED),
                                           ("testing", grpc.StatusCode.PERMISSION_DENIED)])
def test_only_the_coordinator_may_end_a_run(fed: Path, node: str, expected):
    """Another node must not free a worker that a run holds."""
    async def scenario():
        async with server(mtls(fed)) as (address, _):
            async with channel(address, as_node(fed, node)) as ch:
                try:
                    reply = await worker_pb2_grpc.WorkerStub(ch).EndRun(worker_pb2.EndRunRequest(run_id="r"),
                                                                        timeout=TIMEOUT)
                except grpc.aio.AioRpcError as refused:
                    return refused.code()
                return reply.released

    assert asyncio.run(scenario()) == expected


@pytest.mark.parametrize("given,match", [
    ({"cert": "alice.crt"}, "--tls-key, --tls-ca missing"),
    ({"cert": "alice.crt", "key": "alice.key", "ca": "missing.crt"}, "--tls-ca .*missing.crt: cannot read"),
    ({"cert": "alice.crt", "key": "alice.key", "ca": "ca.crt"}, None),
    ({"cert": "alice.crt", "key": "notes.txt", "ca": "ca.crt"}, "--tls-key .*notes.txt: not a PEM file"),
])
def test_tls_flags_are_validated_at_start_up(fed: Path, given: Dict[str, str], match: Optional[str]):
    (fed / "alice" / "notes.txt").write_text("hello")
    paths = {name: str(fed / "alice" / value) for name, value in given.items()}
    if match is None:
        assert tls.TlsFiles.from_flags(paths.get("cert"), paths.get("key"), paths.get("ca")) is not None
        return
    with pytest.raises(InvalidConfig, match=match):
        tls.TlsFiles.from_flags(paths.get("cert"), paths.get("key"), paths.get("ca"))


def test_no_tls_flags_mean_plaintext_and_a_warning(caplog):
    assert tls.TlsFiles.from_flags(None, None, None) is None
    logger = logging.getLogger("worker")
    with caplog.at_level(logging.WARNING, logger="worker"):
        tls.warn_plaintext(logger, "worker alice on 0.0.0.0:8777")
    assert "plaintext: worker alice on 0.0.0.0:8777 without TLS" in caplog.text


def test_tls_flags_default_to_the_environment(monkeypatch):
    monkeypatch.setenv("JETFED_TLS_CERT", "/etc/jetfed/alice.crt")
    parser = argparse.ArgumentParser()
    tls.add_tls_arguments(parser)
    args = parser.parse_args(["--tls-ca", "ca.crt"])
    assert (args.tls_cert, args.tls_key, args.tls_ca) == ("/etc/jetfed/alice.crt", None, "ca.crt")


def test_token_file_is_read_and_checked(tmp_path: Path):
    good, weak = tmp_path / "token", tmp_path / "weak"
    good.write_text(TOKEN + "\n")
    weak.write_text("short\n")
    assert read_token(str(good)) == TOKEN and read_token(None) is None
    with pytest.raises(InvalidConfig, match="--token-file .*at least 16"):
        read_token(str(weak))
    with pytest.raises(InvalidConfig, match="--token-file .*cannot read"):
        read_token(str(tmp_path / "absent"))


@pytest.mark.parametrize("host, who", [
    ("0.0.0.0", "anyone on the network"), ("10.0.0.11", "anyone on the network"),
    ("127.0.0.1", "any user of this machine"), ("::1", "any user of this machine"),
    ("localhost", "any user of this machine"),
])
def test_the_plaintext_warning_says_who_can_listen(caplog, host, who):
    logger = logging.getLogger("worker")
    with caplog.at_level(logging.WARNING, logger="worker"):
        tls.warn_plaintext(logger, f"worker alice on {host}:8777", host)
    assert f"without TLS: {who} can read the weights" in caplog.text
