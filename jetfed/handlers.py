"""Rebuilding a gRPC method handler around a wrapped behaviour: how an aio server
interceptor reaches the servicer context, which `intercept_service` is not given."""

from __future__ import annotations

from typing import Callable

import grpc


def rebuild_handler(handler: grpc.RpcMethodHandler, wrap: Callable[[Callable], Callable]) -> grpc.RpcMethodHandler:
    """The same handler (kind, serializers) with its behaviour replaced by `wrap(behaviour)`."""
    # unary_unary .. stream_stream: the handler's attribute and grpc's factory share the name.
    kind = "_".join("stream" if s else "unary" for s in (handler.request_streaming, handler.response_streaming))
    factory = getattr(grpc, f"{kind}_rpc_method_handler")
    return factory(wrap(getattr(handler, kind)), request_deserializer=handler.request_deserializer,
                   response_serializer=handler.response_serializer)
