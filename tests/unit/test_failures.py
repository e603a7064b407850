"""Failed calls become typed Failures at the proxies (coordinator.failures): gRPC
statuses by the translation table, with real grpc.aio errors and real channels to
nowhere; in-process errors by the same kinds; and the round loop decides "late" on the
kind alone, with the one-line reasons it has always written."""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path
from typing import Any, Dict, List

import grpc
import pytest

from coordinator.clients import Update, Weights, WorkerClient, _border
from coordinator.failures import Failure, Kind, describe_failure, kind_of
from coordinator.federation import Fleet
from coordinator.local_fleet import LocalWorker
from coordinator.runner import run
from jetfed.config import TrainConfig
from jetfed.errors import InvalidConfig, JetfedError, ManifestMismatch, WorkerBusy
from tests.unit.test_buffered import fleet_and_settings

Code = grpc.StatusCode

TABLE = {
    Code.DEADLINE_EXCEEDED: Kind.LATE,
    Code.UNAVAILABLE: Kind.UNREACHABLE,
    Code.FAILED_PRECONDITION: Kind.REFUSED,
    Code.PERMISSION_DENIED: Kind.REFUSED,
    Code.UNAUTHENTICATED: Kind.REFUSED,
    Code.RESOURCE_EXHAUSTED: Kind.REFUSED,
    Code.ABORTED: Kind.REFUSED,
    Code.UNIMPLEMENTED: Kind.REFUSED,
    Code.NOT_FOUND: Kind.REFUSED,
    Code.ALREADY_EXISTS: Kind.REFUSED,
    Code.INVALID_ARGUMENT: Kind.INVALID,
    Code.OUT_OF_RANGE: Kind.INVALID,
    Code.DATA_LOSS: Kind.INVALID,
    Code.INTERNAL: Kind.INTERNAL,
    Code.UNKNOWN: Kind.INTERNAL,
    Code.CANCELLED: Kind.INTERNAL,
}


def rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, initial_metadata=grpc.aio.Metadata(), trailing_metadata=grpc.aio.Metadata(),
                                details=details)


def test_the_table_names_every_failing_status() -> None:
    assert set(TABLE) == set(Code) - {Code.OK}


@pytest.mark.parametrize("code", sorted(TABLE, key=lambda c: c.name), ids=lambda c: c.name)
def test_a_grpc_error_becomes_a_failure_of_its_kind_with_the_same_line(code: grpc.StatusCode) -> None:
    error = rpc_error(code, f"what the peer said about {code.name}")
    with pytest.raises(Failure) as raised:
        with _border():
            raise error
    failure = raised.value
    assert failure.kind is TABLE[code] and kind_of(code) is TABLE[code]
    assert (failure.status, failure.detail, failure.code) == (code.name, f"what the peer said about {code.name}", code)
    assert failure.__cause__ is error
    # The line the run's log, metrics.jsonl and console have always shown for this error.
    assert describe_failure(failure) == f"{code.name}: what the peer said about {code.name}"
    assert isinstance(failure, JetfedError)


def test_an_answer_that_fails_the_clients_checks_is_invalid_and_keeps_its_status() -> None:
    with pytest.raises(Failure) as raised:
        with _border():
            raise ManifestMismatch("result: tensor 'w' is float16, the model's is float32")
    assert raised.value.kind is Kind.INVALID
    assert describe_failure(raised.value) == "FAILED_PRECONDITION: result: tensor 'w' is float16, the model's is float32"


def test_any_other_error_at_the_border_is_internal_named_by_its_type() -> None:
    with pytest.raises(Failure) as raised:
        with _border():
            raise asyncio.InvalidStateError("RPC already finished.")
    assert raised.value.kind is Kind.INTERNAL
    assert describe_failure(raised.value) == "InvalidStateError: RPC already finished."


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_a_worker_nobody_listens_for_is_unreachable_then_late() -> None:
    """A real channel to a closed port: asked without waiting, the connection is refused
    (UNAVAILABLE); asked to wait for the worker, the deadline passes."""
    async def scenario() -> List[Failure]:
        client = WorkerClient("ghost", f"127.0.0.1:{free_port()}", 1 << 16)
        failures = []
        try:
            for wait in (False, True):
                with pytest.raises(Failure) as raised:
                    await client.info(timeout=0.5, wait=wait)
                failures.append(raised.value)
        finally:
            await client.close()
        return failures

    refused, waited = asyncio.run(scenario())
    assert (refused.kind, refused.status) == (Kind.UNREACHABLE, "UNAVAILABLE"), describe_failure(refused)
    assert (waited.kind, waited.status) == (Kind.LATE, "DEADLINE_EXCEEDED"), describe_failure(waited)


@pytest.mark.parametrize("error, kind, line", [
    (WorkerBusy("alice: already training round 3"), Kind.REFUSED, "ABORTED: alice: already training round 3"),
    (InvalidConfig("lr: -1 must be positive"), Kind.INVALID, "INVALID_ARGUMENT: lr: -1 must be positive"),
    (RuntimeError("CUDA out of memory"), Kind.INTERNAL, "RuntimeError: CUDA out of memory"),
], ids=["busy", "bad-config", "crash"])
def test_in_process_work_fails_with_the_kinds_a_board_would(tiny_mnist: Path, tmp_path: Path, error: Exception,
                                                             kind: Kind, line: str) -> None:
    _, trainer, _ = fleet_and_settings(tiny_mnist, tmp_path)

    def work() -> None:
        raise error

    try:
        with pytest.raises(Failure) as raised:
            asyncio.run(trainer.run(work))
    finally:
        trainer.close()
    assert raised.value.kind is kind and describe_failure(raised.value) == line


class Failing(LocalWorker):
    """An in-process worker whose every Train fails with `failure`."""

    failure: Failure

    async def train(self, round_number: int, config: TrainConfig, weights: Weights, timeout: float) -> Update:
        raise self.failure


@pytest.mark.parametrize("failure, late", [
    (Failure(Kind.LATE, "DEADLINE_EXCEEDED", "Deadline Exceeded"), ["bob"]),
    (Failure(Kind.REFUSED, "ABORTED", "bob: already training round 1"), []),
], ids=["late", "refused"])
def test_the_round_records_a_worker_late_by_the_failures_kind(tiny_mnist: Path, tmp_path: Path, failure: Failure,
                                                             late: List[str]) -> None:
    fleet, trainer, settings = fleet_and_settings(tiny_mnist, tmp_path, "--rounds", "1", "--min-workers", "1",
                                                  "--round-retries", "0")
    bob = Failing("bob", fleet.workers["bob"]._trainer, fleet.workers["bob"].data)
    bob.failure = failure
    try:
        asyncio.run(run(settings, say=lambda line: None, fleet=Fleet({**fleet.workers, "bob": bob})))
    finally:
        trainer.close()
    records: List[Dict[str, Any]] = [json.loads(line) for line in
                                     (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["workers"], r["late"]) for r in records] == [(["alice"], late)]
    assert records[0]["failed"] == {"bob": describe_failure(failure)}


class Broken(LocalWorker):
    """A proxy with a bug: what it raises is no Failure."""

    async def train(self, round_number: int, config: TrainConfig, weights: Weights, timeout: float) -> Update:
        raise TypeError("a bug, not a failed call")


def test_an_error_that_is_no_failure_ends_an_asynchronous_run_at_once(tiny_mnist: Path, tmp_path: Path) -> None:
    """Not taken for a worker's failure and retried, nor left to the step timeout."""
    fleet, trainer, settings = fleet_and_settings(tiny_mnist, tmp_path, "--strategy", "fedbuff", "--rounds", "2",
                                                  "--round-timeout", "60")
    bob = Broken("bob", fleet.workers["bob"]._trainer, fleet.workers["bob"].data)
    try:
        with pytest.raises(TypeError, match="a bug, not a failed call"):
            asyncio.run(asyncio.wait_for(run(settings, say=lambda line: None,
                                             fleet=Fleet({**fleet.workers, "bob": bob})), 30))
    finally:
        trainer.close()
