"""Secure aggregation's failures. Each names what broke and who sent it, so the
service border can turn it into a status and a log line, and the coordinator can drop
one hostile message without losing the round (a `ProtocolViolation` is the sender's
fault; `BelowThreshold` and `AggregateOutOfRange` fail the round, never the run)."""

from __future__ import annotations

import grpc

from jetfed.errors import JetfedError


class SecAggError(JetfedError):
    """Base of every secure-aggregation failure."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class SecAggUnavailable(SecAggError):
    """The `cryptography` package is missing on this machine."""

    code = grpc.StatusCode.UNIMPLEMENTED


class SecAggConfigError(SecAggError):
    """A setting that cannot work with secure aggregation (range, threshold, aggregator)."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class ProtocolViolation(SecAggError):
    """A message that breaks the protocol: wrong stage, duplicate, wrong length, a
    share that does not decrypt or reconstruct. The message is refused; the state is
    left as it was before it."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class BelowThreshold(SecAggError):
    """Fewer workers than the threshold took part in a stage: the round cannot be
    unmasked, and nothing was reconstructed."""

    code = grpc.StatusCode.UNAVAILABLE


class AggregateOutOfRange(SecAggError):
    """The unmasked sum lies outside what the declared range allows: some worker sent a
    vector this protocol did not make. The round's aggregate is refused."""

    code = grpc.StatusCode.DATA_LOSS
