"""Typed failures, raised where the fault is found and turned into a gRPC status at
the service border (each class carries the status it maps to)."""

from __future__ import annotations

import grpc


class JetfedError(Exception):
    """Base of every error jetfed raises on purpose."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class InvalidConfig(JetfedError):
    """A configuration field is out of range; the message names the field."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class UnknownModel(InvalidConfig):
    """A model name that the registry does not hold."""


class UnknownTask(InvalidConfig):
    """A task that is neither installed (entry point `jetfed.tasks`) nor importable as
    `package.module:attr`, or that is not a Task."""


class BadStream(JetfedError):
    """A message stream that breaks the protocol (no header, chunk out of order...)."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class StreamStalled(BadStream):
    """A weight stream that did not finish in time; its sender holds no lock forever."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class CorruptPayload(JetfedError):
    """Weight bytes that do not match their manifest (size, checksum, format)."""

    code = grpc.StatusCode.DATA_LOSS


class PayloadTooLarge(JetfedError):
    """A weight stream larger than the receiver accepts."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class ManifestMismatch(JetfedError):
    """Weights whose names, dtypes or shapes differ from the model being served."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class NonFiniteWeights(JetfedError):
    """Weights holding NaN or Inf; loading them would poison every later round."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class DataNotFound(JetfedError):
    """The data set is not on disk and could not be downloaded."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class AddressInUse(InvalidConfig):
    """A port this process must bind is already taken; the message names the address and
    the setting that moves it."""


class TrainingStopped(JetfedError):
    """A round stopped between batches because nobody awaits it any more (its call was
    cancelled or ran out of time, or the service is stopping)."""

    code = grpc.StatusCode.CANCELLED


class WorkerStateError(JetfedError):
    """The worker's own state on its disk (SCAFFOLD's control variates, worker
    --state-dir) cannot be written, or what is there cannot be trusted; the message
    names the setting or the file and what to do."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class WorkerBusy(JetfedError):
    """A worker already holds a round (training it, or stopping an abandoned one)."""

    code = grpc.StatusCode.ABORTED


class RunConflict(JetfedError):
    """A Train from another run while the worker still serves the run it has been serving."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    # Every refusal's details begin with this, so a coordinator tells it on the wire from
    # the other FAILED_PRECONDITIONs (another model's weights) without a status of its own.
    MARKER = "two coordinators are driving"
