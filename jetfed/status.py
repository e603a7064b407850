"""Where typed errors become gRPC statuses: one place, so every service answers a fault
with the same precise code and a log line that greps well.

Status details and log lines often quote what a client sent (a tensor name, a
checksum); a hostile client can make those megabytes long. `echo` is how a client's
value enters a message, and the border caps every detail string once more."""

from __future__ import annotations

import contextlib
import logging
from typing import AsyncIterator

import grpc

from jetfed.errors import JetfedError

log = logging.getLogger(__name__)

ECHO_CHARS = 80
MAX_DETAILS_BYTES = 512


def echo(text: str, limit: int = ECHO_CHARS) -> str:
    """A client's `text` as a message may quote it: escaped to printable ASCII (so a
    character is a byte and a newline cannot forge a log line), and cut to `limit`
    characters with the original length named."""
    escaped = ascii(text)[1:-1]
    if len(escaped) <= limit:
        return escaped
    return f"{escaped[:limit]}...({len(text)} chars)"


def capped(details: str, limit: int = MAX_DETAILS_BYTES) -> str:
    """`details` cut to `limit` UTF-8 bytes: the last guard against an echo someone forgot."""
    raw = details.encode("utf-8", "replace")
    if len(raw) <= limit:
        return details
    return raw[:limit - 3].decode("utf-8", "ignore") + "..."


@contextlib.asynccontextmanager
async def rpc_status(context: grpc.aio.ServicerContext, rpc: str) -> AsyncIterator[None]:
    """Abort the RPC with the error's status; anything unexpected becomes INTERNAL,
    logged with its traceback, and the service keeps serving."""
    try:
        yield
    except grpc.aio.AbortError:
        raise
    except JetfedError as exc:
        details = capped(str(exc))
        log.warning("rpc=%s peer=%s status=%s %s", rpc, context.peer(), exc.code.name, details)
        await context.abort(exc.code, details)
    except Exception as exc:
        log.exception("rpc=%s peer=%s status=INTERNAL", rpc, context.peer())
        await context.abort(grpc.StatusCode.INTERNAL, capped(f"{rpc} failed: {type(exc).__name__}: {exc}"))
