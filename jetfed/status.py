"""Where typed errors become gRPC statuses: one place, so every service answers a fault
with the same precise code and a log line that greps well."""

from __future__ import annotations

import contextlib
import logging
from typing import AsyncIterator

import grpc

from jetfed.errors import JetfedError

log = logging.getLogger(__name__)


@contextlib.asynccontextmanager
async def rpc_status(context: grpc.aio.ServicerContext, rpc: str) -> AsyncIterator[None]:
    """Abort the RPC with the error's status; anything unexpected becomes INTERNAL,
    logged with its traceback, and the service keeps serving."""
    try:
        yield
    except grpc.aio.AbortError:
        raise
    except JetfedError as exc:
        log.warning("rpc=%s peer=%s status=%s %s", rpc, context.peer(), exc.code.name, exc)
        await context.abort(exc.code, str(exc))
    except Exception as exc:
        log.exception("rpc=%s peer=%s status=INTERNAL", rpc, context.peer())
        await context.abort(grpc.StatusCode.INTERNAL, f"{rpc} failed: {type(exc).__name__}: {exc}")
