"""What a call to a worker or the evaluator ends in when it fails, whatever carried it:
a Failure of one Kind. The proxies make them at their border (clients.py from gRPC
statuses and from its checks of an answer, local_fleet.py from what in-process work
raises), so the round drivers decide on kinds (a LATE worker is recorded as late) and
never import grpc."""

from __future__ import annotations

import enum
from typing import Dict

import grpc

from jetfed.errors import JetfedError


class Kind(enum.Enum):
    LATE = "late"  # the call's deadline passed
    UNREACHABLE = "unreachable"  # no connection: refused, unavailable, TLS handshake failed
    REFUSED = "refused"  # the peer said no on purpose: busy, another run's, not allowed, too much
    INVALID = "invalid"  # a request or answer broke the contract, or the answer failed our checks
    INTERNAL = "internal"  # anything else: the peer crashed, or a status this table does not know


_KIND_OF_STATUS: Dict[grpc.StatusCode, Kind] = {
    grpc.StatusCode.DEADLINE_EXCEEDED: Kind.LATE,
    grpc.StatusCode.UNAVAILABLE: Kind.UNREACHABLE,
    grpc.StatusCode.FAILED_PRECONDITION: Kind.REFUSED,
    grpc.StatusCode.PERMISSION_DENIED: Kind.REFUSED,
    grpc.StatusCode.UNAUTHENTICATED: Kind.REFUSED,
    grpc.StatusCode.RESOURCE_EXHAUSTED: Kind.REFUSED,
    grpc.StatusCode.ABORTED: Kind.REFUSED,  # a worker busy with another round
    grpc.StatusCode.UNIMPLEMENTED: Kind.REFUSED,  # a peer too old for the call
    grpc.StatusCode.NOT_FOUND: Kind.REFUSED,
    grpc.StatusCode.ALREADY_EXISTS: Kind.REFUSED,
    grpc.StatusCode.INVALID_ARGUMENT: Kind.INVALID,
    grpc.StatusCode.OUT_OF_RANGE: Kind.INVALID,
    grpc.StatusCode.DATA_LOSS: Kind.INVALID,
}


def kind_of(code: grpc.StatusCode) -> Kind:
    """The kind of failure a call that ended with `code` is."""
    return _KIND_OF_STATUS.get(code, Kind.INTERNAL)


class Failure(JetfedError):
    """A call to a peer that failed: its kind, the status it ended with (a gRPC status
    name; for an error no status describes, its type name, as the run's lines have
    always shown it) and what went wrong, as the peer or the check said it."""

    def __init__(self, kind: Kind, status: str, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind
        self.status = status
        self.detail = detail
        self.code = grpc.StatusCode.__members__.get(status, grpc.StatusCode.INTERNAL)

    @classmethod
    def of_rpc(cls, error: grpc.aio.AioRpcError) -> "Failure":
        """The failure a gRPC call ended in, by its status."""
        code = error.code()
        return cls(kind_of(code), code.name, error.details() or "")

    @classmethod
    def of_error(cls, error: Exception, checked: bool = False) -> "Failure":
        """The failure an error raised on this side stands for. `checked`: the peer's
        answer failed one of our checks (INVALID, whatever the check's status); otherwise
        a jetfed error counts as the status it would cross a wire with, and any other
        error as INTERNAL."""
        if isinstance(error, Failure):
            return error
        if isinstance(error, JetfedError):
            return cls(Kind.INVALID if checked else kind_of(error.code), error.code.name, str(error))
        return cls(Kind.INTERNAL, type(error).__name__, str(error))


def describe_failure(error: BaseException) -> str:
    """A failed call or check as one line: its status, then what went wrong."""
    if isinstance(error, Failure):
        return f"{error.status}: {error.detail}"
    if isinstance(error, JetfedError):
        return f"{error.code.name}: {error}"
    return f"{type(error).__name__}: {error}"
