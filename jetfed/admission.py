"""How many weight streams a service receives at once: each admitted stream may buffer
up to the payload limit, so a count of streams is what bounds a service's memory. The
excess is refused at once with RESOURCE_EXHAUSTED, never queued: a queue would hold
the callers' connections and their unread bytes instead.

Like the other interceptors (jetfed.auth, jetfed.telemetry), it returns the handler
rebuilt around a wrapped behaviour, since an aio interceptor sees no servicer context."""

from __future__ import annotations

import inspect
import logging
from typing import Any, Awaitable, Callable, Iterable, Optional

import grpc

from jetfed.errors import InvalidConfig
from jetfed.handlers import rebuild_handler

log = logging.getLogger(__name__)

SETTING = "--max-concurrent-streams"


class ConcurrencyLimit(grpc.aio.ServerInterceptor):
    """Admits at most `limit` calls of `methods` (full names, /package.Service/Method) at
    a time, counted together; other methods pass untouched. `who` names the service in
    the refusal, so a caller knows which limit it met."""

    def __init__(self, methods: Iterable[str], limit: int, who: str) -> None:
        if limit < 1:
            raise InvalidConfig(f"{SETTING}: {limit} must be at least 1")
        self._methods = frozenset(methods)
        self._limit = limit
        self._who = who
        self._active = 0

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Optional[grpc.RpcMethodHandler]:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method not in self._methods:
            return handler
        return rebuild_handler(handler, lambda behaviour: self._wrap(behaviour, method))

    async def _admit(self, method: str, context: grpc.aio.ServicerContext) -> None:
        """Take a slot, or log and abort (abort raises). The check and the increment run
        with no await between them, so two calls on the event loop cannot both take the
        last slot."""
        if self._active < self._limit:
            self._active += 1
            return
        log.warning("refused rpc=%s peer=%s status=RESOURCE_EXHAUSTED active=%d limit=%d",
                    method, context.peer(), self._active, self._limit)
        await context.abort(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"{self._who} is receiving {self._active} weight streams, its limit ({SETTING} {self._limit}); "
            "retry when one has finished",
        )

    def _release(self) -> None:
        self._active -= 1

    def _wrap(self, behaviour: Callable, method: str) -> Callable:
        """`behaviour` run inside a slot, keeping its kind: gRPC tells a yielding stream
        handler from a writing one by inspecting it."""
        if inspect.isasyncgenfunction(behaviour):
            async def yielding(request_or_iterator: Any, context: Any) -> Any:
                await self._admit(method, context)
                responses = behaviour(request_or_iterator, context)
                try:
                    async for response in responses:
                        yield response
                finally:
                    try:
                        await responses.aclose()
                    finally:
                        self._release()
            return yielding
        if inspect.iscoroutinefunction(behaviour):
            async def awaiting(request_or_iterator: Any, context: Any) -> Any:
                await self._admit(method, context)
                try:
                    return await behaviour(request_or_iterator, context)
                finally:
                    self._release()
            return awaiting
        raise TypeError(f"{behaviour!r} is not async; ConcurrencyLimit guards grpc.aio servicers only")
