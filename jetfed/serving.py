"""The transport scaffold every service shares: an aio server with health and
reflection, built apart from running it (so a test can bind port 0), and a run loop
that turns SIGTERM/SIGINT into a graceful stop."""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass
from typing import Callable, Iterable, List, Optional, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from jetfed import readiness
from jetfed.errors import AddressInUse
from jetfed.stream import MAX_MESSAGE_BYTES

log = logging.getLogger(__name__)

# Each stream's HTTP/2 receive window starts at this many bytes (gRPC's default: 64
# KiB). A model crosses a connection once a round, too rarely for gRPC's bandwidth
# probing to widen the window, so at 64 KiB a 1 MiB chunk waited for ~16 window
# updates, a round trip between the two event loops each: 300 zero-compute workers took
# 9.5 s a round, 4.5 s with this window (bench/fleet_scale.py). A whole chunk message
# may now be in flight unacknowledged; a receiver holds at most this much per stream
# that it has not read.
STREAM_WINDOW_BYTES = MAX_MESSAGE_BYTES

# Headroom over the largest chunk plus its envelope.
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.http2.lookahead_bytes", STREAM_WINDOW_BYTES),
]
# gRPC binds with SO_REUSEPORT by default, so a second process on a taken port binds
# too and silently takes half the connections. A port is one service's.
SERVER_OPTIONS = CHANNEL_OPTIONS + [("grpc.so_reuseport", 0)]


@dataclass
class Service:
    """One gRPC service to host: its full name and how to add it to a server."""

    name: str
    add_to_server: Callable[[grpc.aio.Server], None]


@dataclass
class RunningServer:
    server: grpc.aio.Server
    port: int
    health: health_aio.HealthServicer
    services: List[str]

    async def mark_serving(self) -> None:
        for name in ["", *self.services]:
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    async def mark_not_serving(self) -> None:
        """Say the service cannot take work for now (mark_serving says it can again);
        once shutdown has begun, health stays NOT_SERVING whatever is marked."""
        for name in ["", *self.services]:
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)

    async def stop(self, grace: float) -> None:
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)


async def start_server(
    services: Iterable[Service], host: str, port: int,
    credentials: Optional[grpc.ServerCredentials] = None,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    setting: str = "--port",
) -> RunningServer:
    """Start a server hosting `services`, health and reflection; `port=0` picks a free port.
    With `credentials` the port speaks TLS only (jetfed.tls); `interceptors` see every RPC.
    A taken port raises AddressInUse naming `setting`, the flag or key that moves it."""
    server = grpc.aio.server(options=SERVER_OPTIONS, interceptors=list(interceptors))
    services = list(services)
    for service in services:
        service.add_to_server(server)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    names = [s.name for s in services]
    reflection.enable_server_reflection(
        [*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
        server,
    )
    address = f"{host}:{port}"
    try:
        bound = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    except RuntimeError:  # grpcio raises where older releases returned 0
        bound = 0
    if bound == 0:
        raise AddressInUse(
            f"{setting}: cannot listen on {address}: the port is taken by another process (or the host is not "
            f"an address of this machine); stop that process or choose another {setting}"
        )
    await server.start()
    running = RunningServer(server, bound, health, names)
    await running.mark_serving()
    log.info("listening on %s:%d services=%s tls=%s", host, bound, ",".join(names), "on" if credentials else "off")
    return running


async def serve_until_signal(running: RunningServer, grace: float, stop: Optional[asyncio.Event] = None) -> None:
    """Serve until SIGTERM or SIGINT (or `stop` is set); health turns NOT_SERVING first so
    balancers and the coordinator stop sending, then RPCs in flight get `grace` seconds."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("stopping: grace=%.1fs", grace)
    readiness.notify("STOPPING=1")
    await running.stop(grace)
    log.info("stopped")
