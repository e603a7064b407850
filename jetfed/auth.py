"""Who may call what: a grpc.aio server interceptor that lets a protected method run only
for a caller whose certificate carries an allowed role (the OU `jetfed certs` writes)
or, when TLS is off, who sends the federation's shared bearer token.

An aio interceptor sees the method name and metadata but not the peer, so for a
protected method it returns the same handler with its behaviour wrapped: the wrapper
reads `context.auth_context()` and aborts before the servicer runs."""

from __future__ import annotations

import argparse
import functools
import hmac
import inspect
import logging
import os
import re
from pathlib import Path
from typing import Awaitable, Callable, Iterable, Mapping, Optional, Set, Tuple

import grpc
from google.protobuf.descriptor import ServiceDescriptor

from jetfed.errors import InvalidConfig
from jetfed.handlers import rebuild_handler

log = logging.getLogger(__name__)

TOKEN_FLAG = "--token-file"
TOKEN_ENV = "JETFED_TOKEN_FILE"
MIN_TOKEN_CHARS = 16
# Initial metadata the guard sends as soon as it admits a caller (see await_admission).
ADMITTED = ("jetfed-admitted", "1")
METHOD = re.compile(r"^/[\w.]+/\w+$")
# OpenSSL's RFC 2253 form, as gRPC puts it in the auth context: "CN=alice,OU=worker,O=jetfed".
RDN_SPLIT = re.compile(r"(?<!\\)[,+]")
def service_methods(service: ServiceDescriptor, public: Iterable[str] = ("GetInfo",)) -> Set[str]:
    """Full names of `service`'s methods except `public` ones: protecting by default means
    an RPC added later is guarded without anyone remembering to list it."""
    return {f"/{service.full_name}/{m.name}" for m in service.methods if m.name not in set(public)}


def certificate_role(auth_context: Mapping[str, Iterable[bytes]]) -> Optional[str]:
    """The single OU of the peer certificate's subject; None when it names none or several
    (a certificate this CA did not mean for anyone gets no role, not the first one)."""
    subjects = list(auth_context.get("x509_subject", ()))
    if len(subjects) != 1:
        return None
    units = [part.strip()[3:] for part in RDN_SPLIT.split(subjects[0].decode("utf-8", "replace"))
             if part.strip().upper().startswith("OU=")]
    return units[0] if len(units) == 1 else None


def _bearer(metadata: Iterable[Tuple[str, object]]) -> Optional[str]:
    for key, value in metadata or ():
        if key.lower() == "authorization" and isinstance(value, str):
            scheme, _, token = value.partition(" ")
            if scheme.lower() == "bearer":
                return token.strip()
    return None


class CallerAuthorization(grpc.aio.ServerInterceptor):
    """Guards `protected` methods; every other method (health, reflection, GetInfo) passes.

    A caller with a client certificate is judged by its role alone (PERMISSION_DENIED if
    not allowed); a caller without one must send `authorization: Bearer <token>`
    (UNAUTHENTICATED otherwise, always so when `token` is None). Install it only where
    callers can prove something: mutual TLS, a token, or both."""

    def __init__(self, protected: Set[str], allowed_roles: Set[str], token: Optional[str] = None) -> None:
        malformed = sorted(m for m in protected if not METHOD.match(m))
        if malformed:
            raise ValueError(f"protected methods must look like /package.Service/Method: {malformed}")
        if token is not None and not token:
            raise ValueError("an empty token would let anyone in; pass None to require certificates")
        self._protected = frozenset(protected)
        self._allowed = frozenset(allowed_roles)
        self._token = token.encode() if token is not None else None

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method not in self._protected:
            return handler
        authorize = functools.partial(self._authorize, method)
        return rebuild_handler(handler, lambda behaviour: _guarded(behaviour, authorize))

    async def _authorize(self, method: str, context: grpc.aio.ServicerContext) -> None:
        """Admit the caller, telling it at once (ADMITTED), or log and abort (abort raises)."""
        refusal = self._refusal(method, context)
        if refusal is None:
            await context.send_initial_metadata((ADMITTED,))
            return
        code, role, details = refusal
        log.warning("refused rpc=%s peer=%s status=%s role=%s", method, context.peer(), code.name, role or "-")
        await context.abort(code, details)

    def _refusal(self, method: str, context: grpc.aio.ServicerContext) -> Optional[Tuple[grpc.StatusCode, Optional[str], str]]:
        """Why the caller may not run `method` (status, role, details); None if it may."""
        auth = context.auth_context()
        if "x509_subject" in auth or "x509_pem_cert" in auth:
            role = certificate_role(auth)
            if role in self._allowed:
                return None
            return grpc.StatusCode.PERMISSION_DENIED, role, f"role {role or 'none'} may not call {method}"
        token = _bearer(context.invocation_metadata())
        if self._token is not None and token is not None and hmac.compare_digest(token.encode(), self._token):
            return None
        why = "a wrong bearer token" if token is not None else "no client certificate and no bearer token"
        return grpc.StatusCode.UNAUTHENTICATED, None, f"{method} refused: {why}"


def _guarded(behaviour: Callable, authorize: Callable[[grpc.aio.ServicerContext], Awaitable[None]]) -> Callable:
    """`behaviour` run after `authorize`, keeping its kind: gRPC tells a streaming handler
    that yields (async generator) from one that writes (coroutine) by inspecting it."""
    if inspect.isasyncgenfunction(behaviour):
        async def stream(request_or_iterator, context):
            await authorize(context)
            responses = behaviour(request_or_iterator, context)
            try:
                async for response in responses:
                    yield response
            finally:
                await responses.aclose()
        return stream
    if inspect.iscoroutinefunction(behaviour):
        async def call(request_or_iterator, context):
            await authorize(context)
            return await behaviour(request_or_iterator, context)
        return call
    raise TypeError(f"{behaviour!r} is not async; CallerAuthorization guards grpc.aio servicers only")


async def await_admission(call: grpc.aio.Call) -> None:
    """Wait until a server guarded by CallerAuthorization admits `call`, before streaming
    a payload into it; raise its refusal otherwise. Needed because a grpc.aio client whose
    write is in flight when a refusal arrives reports INTERNAL instead (grpc/grpc#36066).
    Only for guarded servers: an unguarded one may send no metadata until it answers."""
    metadata = await call.initial_metadata()
    if any(key == ADMITTED[0] for key, _ in metadata or ()):
        return
    code = await call.code()
    raise grpc.aio.AioRpcError(code, metadata, await call.trailing_metadata(), await call.details())


def add_token_argument(parser: argparse.ArgumentParser) -> None:
    """--token-file (default $JETFED_TOKEN_FILE): a file, not a flag value, so the token
    stays out of `ps` and shell history."""
    parser.add_argument(TOKEN_FLAG, default=os.environ.get(TOKEN_ENV) or None, metavar="PATH",
                        help=f"file holding the federation's shared bearer token (default ${TOKEN_ENV})")


def read_token(path: Optional[str]) -> Optional[str]:
    """The token in `path` (surrounding whitespace dropped), None when no file is named."""
    if not path:
        return None
    try:
        token = Path(path).read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidConfig(f"{TOKEN_FLAG} {path}: cannot read an ASCII token ({exc})") from exc
    if len(token) < MIN_TOKEN_CHARS or not token.isprintable() or " " in token:
        raise InvalidConfig(f"{TOKEN_FLAG} {path}: the token must be at least {MIN_TOKEN_CHARS} printable "
                            "characters without spaces (e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')")
    return token


def bearer_metadata(token: Optional[str]) -> Tuple[Tuple[str, str], ...]:
    """Call metadata carrying `token`, for a client of a server without TLS."""
    return (("authorization", f"Bearer {token}"),) if token else ()
