"""A run from start (or resume) to its final model: output folder, metrics, checkpoints
and timing around the Federation's rounds."""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Set

from coordinator import checkpoint, report, resume
from coordinator.board import RunBoard
from coordinator.buffered import BufferedDriver, Step, settle
from coordinator.clients import Score
from coordinator.discovery import Resolve, WorkerDns, grpc_probe, resolve_tcp
from coordinator.failures import describe_failure
from coordinator.federation import Federation, Fleet, RunFailed, RunSummary, Say
from coordinator.progress import Progress
from coordinator.rounds import Console, RoundDriver, settled
from coordinator.settings import RunSettings
from coordinator.status_service import CoordinatorStatusService
from jetfed import serving, tls
from jetfed.telemetry import RpcMetricsInterceptor, RunTelemetry, Telemetry
from jetfed.v1 import coordinator_pb2, coordinator_pb2_grpc

log = logging.getLogger(__name__)


@contextlib.contextmanager
def _writing(what: Path, hint: str) -> Iterator[None]:
    """A full disk, a read-only or missing --out: one line naming the path and the
    fix, not a traceback."""
    try:
        yield
    except OSError as exc:
        raise RunFailed(f"out: cannot use {exc.filename or what}: {exc.strerror or exc}; {hint}") from exc


async def _serve_status(settings: RunSettings, federation: Federation) -> Optional[serving.RunningServer]:
    """With TLS on, the status speaks mutual TLS with the coordinator's certificate: any
    node the federation's CA signed may read it (it is read-only), nobody else."""
    if not settings.status_address:
        return None
    host, _, port = settings.status_address.rpartition(":")
    service = CoordinatorStatusService(federation.board)
    name = coordinator_pb2.DESCRIPTOR.services_by_name["Coordinator"].full_name
    credentials = settings.tls.server_credentials() if settings.tls else None
    if credentials is None:
        tls.warn_plaintext(log, f"the status service on {settings.status_address}", host)
    return await serving.start_server(
        [serving.Service(name, lambda server: coordinator_pb2_grpc.add_CoordinatorServicer_to_server(service, server))],
        host, int(port), credentials, interceptors=[RpcMetricsInterceptor(federation.telemetry)],
        setting="--status-address",
    )


def _serve_metrics(settings: RunSettings, telemetry: Telemetry) -> None:
    if not settings.metrics_address:
        return
    host, _, port = settings.metrics_address.rpartition(":")
    bound = telemetry.start_http(host, int(port), setting="--metrics-address")
    log.info("metrics on http://%s:%d/metrics", host, bound)


async def run(
    settings: RunSettings, say: Say = print, live: bool = False, telemetry: Optional[RunTelemetry] = None,
    fleet: Optional[Fleet] = None, resolve: Resolve = resolve_tcp,
) -> RunSummary:
    """`live` draws progress in the terminal; the reference lines print above it.
    `telemetry` records the run (a fresh one by default), served at --metrics-address.
    `fleet` runs it on other proxies than gRPC clients (`jetfed simulate`). `resolve`
    looks up --workers-dns (the system's resolver by default)."""
    dns = None
    if settings.workers_dns is not None and fleet is None:
        probe = grpc_probe(settings.chunk_bytes, settings.channel_credentials(), settings.token)
        dns = WorkerDns(settings.workers_dns, probe, resolve)
        settings = await _named_by_dns(settings, dns, say)
    board = RunBoard.for_workers(settings.rounds, str(settings.out_dir), settings.workers)
    telemetry = telemetry or RunTelemetry()
    if not live:
        return await _run(settings, board, say, telemetry, fleet, dns)
    async with Progress(board) as progress:
        return await _run(settings, board, progress.say, telemetry, fleet, dns)


async def _named_by_dns(settings: RunSettings, dns: WorkerDns, say: Say) -> RunSettings:
    """The run's workers at the start: those given by --worker and those DNS names now
    (waiting up to --connect-timeout for --min-workers of them, or one)."""
    say(f"Looking up workers at {dns.target} (up to {settings.connect_timeout:.0f}s)")
    workers = await dns.first(settings.workers, settings.min_workers or 1, settings.connect_timeout)
    found = {name: address for name, address in workers.items() if name not in settings.workers}
    say(f"DNS named {len(found)} workers: " + ", ".join(f"{name} at {address}" for name, address in found.items()))
    return replace(settings, workers=workers).validated()


async def _look_again(dns: WorkerDns, federation: Federation) -> None:
    """Between rounds: a worker DNS names for the first time joins the next round, one
    found at a new address (its pod replaced) is asked there. Bounded (WorkerDns), and a
    failed lookup keeps the workers known."""
    joins = await dns.look(federation.settings.workers)
    for name, address in joins.workers.items():
        moved = name in federation.workers
        await federation.join(name, address)
        line = f"Worker {name} {'moved to' if moved else 'joined at'} {address} ({dns.target})"
        federation.say(line)
        log.info("%s", line)


async def _run(
    settings: RunSettings, board: RunBoard, say: Say, telemetry: RunTelemetry, fleet: Optional[Fleet],
    dns: Optional[WorkerDns] = None,
) -> RunSummary:
    federation = Federation(settings, say, board, telemetry, fleet)
    status_server = None
    metrics: Optional[report.MetricsLog] = None
    try:
        # Ports first: a taken status or metrics port must fail before anything is written.
        _serve_metrics(settings, telemetry)
        status_server = await _serve_status(settings, federation)
        with _writing(settings.out_dir, "choose a writable --out"):
            settings.out_dir.mkdir(parents=True, exist_ok=True)
            first = resume.first_round(settings, federation, say)
            metrics = report.MetricsLog(settings.out_dir / "metrics.jsonl")
        if first == 1 and settings.init_weights is not None:
            federation.start_from_file()
        board.first_round = first
        log.info("run=%s out=%s first_round=%d%s", federation.run_id, settings.out_dir, first,
                 " resumed" if first > 1 else "")
        if settings.strategy.asynchronous:
            return await _versions(settings, federation, metrics, first, dns)
        return await _rounds(settings, federation, metrics, first, dns)
    except BaseException as exc:
        board.end(describe_failure(exc) if isinstance(exc, Exception) else "stopped")
        raise
    finally:
        if metrics is not None:
            metrics.close()
        await federation.close()
        if status_server is not None:
            await status_server.stop(grace=1.0)
        telemetry.stop_http()


def _commit(
    settings: RunSettings, federation: Federation, metrics: report.MetricsLog, record: Dict[str, Any],
    step: Optional[Step] = None,
) -> None:
    """The checkpoint first, carrying the round's record, then the metrics line: a stop
    between the two leaves a checkpoint whose record --resume puts back, never a
    metrics line without its checkpoint. An asynchronous `step` brings its own model
    and strategy state (the fleet has moved on since)."""
    number, folder = record["round"], settings.out_dir / "checkpoint"
    state = step.weights.state if step else federation.global_weights.state
    strategy = step.strategy_state if step else federation.strategy.state_dict()
    with _writing(folder, f"free space, then --resume runs round {number} again"):
        checkpoint.save(folder, number, state, federation.model, resume.run_identity(settings, federation.model),
                        record, run_id=federation.run_id, strategy=strategy)
    with _writing(metrics.path, f"free space, then --resume takes round {number}'s record from its checkpoint"):
        metrics.write(record)
    spent = record.get("privacy")
    if spent:  # DP-SGD, either driver: the contributors' epsilons, as the metrics line has them
        federation.board.privacy_spent(spent["epsilon"], spent["delta"])
        federation.telemetry.set_epsilon(spent["epsilon"])


async def _rounds(
    settings: RunSettings, federation: Federation, metrics: report.MetricsLog, first: int,
    dns: Optional[WorkerDns] = None,
) -> RunSummary:
    """Connect, then run rounds `first`..N (coordinator.rounds), each committed in order
    once its evaluation, which runs beside the next rounds, is in; with `dns`, workers
    it names later join between rounds."""
    board = federation.board
    model_path = settings.out_dir / "model.safetensors"
    final: Optional[Score] = None
    started = time.perf_counter()
    await federation.connect()
    connect_seconds = time.perf_counter() - started
    console = Console(federation.say)
    federation.say = console.say
    look_again = (lambda: _look_again(dns, federation)) if dns is not None else None
    driver = RoundDriver(federation, first, console, look_again)
    async for step in driver.steps():
        record = step.record
        evaluation = await settled(step)
        if evaluation is not None:
            record["eval_s"] = evaluation.seconds
            if evaluation.error:
                record["evaluation_error"] = evaluation.error
            else:
                record["evaluation"] = {key: report.score_record(s) for key, s in evaluation.scores.items()}
                final = evaluation.scores["global"] if record["round"] == settings.rounds else final
        _commit(federation.settings, federation, metrics, record, step)
        if step.committed is not None:
            step.committed.set()
        console.release(record["round"], evaluation.lines if evaluation is not None else [])
    with _writing(model_path, "free space, then --resume writes it from the last checkpoint"):
        checkpoint.write_model(model_path, federation.global_weights.state, federation.model, settings.rounds)
    board.end()
    settings = federation.settings
    # Training ends with the last round; evaluation is what the run waited for after it.
    trained = driver.tally.trained_at - started - connect_seconds
    return RunSummary(
        rounds=settings.rounds - first + 1, final_score=final, connect_seconds=connect_seconds,
        train_seconds=trained, eval_seconds=time.perf_counter() - driver.tally.trained_at,
        model_path=model_path, workers=len(settings.workers), absent_at_start=dict(federation.absent),
        never_contributed=[name for name in settings.workers if name not in driver.tally.contributed],
    )


async def _versions(
    settings: RunSettings, federation: Federation, metrics: report.MetricsLog, first: int,
    dns: Optional[WorkerDns] = None,
) -> RunSummary:
    """Connect, then let the asynchronous driver make versions `first`..N; each is
    committed once its evaluation (if due) is done, while the fleet trains on; with
    `dns`, workers it names later join after a step."""
    board, say, telemetry = federation.board, federation.say, federation.telemetry
    model_path = settings.out_dir / "model.safetensors"
    final: Optional[Score] = None
    contributed: Set[str] = set()
    started = time.perf_counter()
    await federation.connect()
    connect_seconds = time.perf_counter() - started
    say(f"Training asynchronously with {settings.strategy.describe()}: versions {first}..{settings.rounds}, "
        f"evaluated every {settings.eval_every}")
    driver = BufferedDriver(federation, first, (lambda: _look_again(dns, federation)) if dns is not None else None)
    groups = await federation.label_groups()
    last = time.perf_counter()
    eval_total = 0.0
    async for step in driver.steps():
        record = step.record
        version = record["version"]
        telemetry.set_round(version)
        waited = time.perf_counter()
        score = await settle(step)
        if step.evaluation is not None:
            eval_total += time.perf_counter() - waited
            if score is None:
                record["evaluation_error"] = "the evaluator did not score this version (see the log)"
            else:
                record["evaluation"] = {"global": report.score_record(score)}
                say(f"Version {version}/{settings.rounds} ({record['elapsed_s']:.1f}s):")
                for line in report.score_lines("Federated model", score, groups):
                    say(line)
                board.evaluated(version, {"global": score})
                telemetry.set_evaluation(version, {"global": score.metrics})
                final = score if version == settings.rounds else final
        now = time.perf_counter()
        record["train_s"] = record["duration_s"] = now - last
        last = now
        contributed.update(record["workers"])
        telemetry.set_workers_contributing(len(set(record["workers"])))
        telemetry.observe_round(record["duration_s"], "completed")
        board.end_round(record["duration_s"])
        board.round = version
        log.info("version=%d/%d updates=%d staleness=%s elapsed=%.1fs", version, settings.rounds,
                 len(record["workers"]), [u["staleness"] for u in record["updates"].values()], record["elapsed_s"])
        _commit(settings, federation, metrics, record, step)
    with _writing(model_path, "free space, then --resume writes it from the last checkpoint"):
        checkpoint.write_model(model_path, federation.global_weights.state, federation.model, settings.rounds)
    board.end()
    settings = federation.settings  # with the workers that joined
    total = time.perf_counter() - started - connect_seconds
    return RunSummary(
        rounds=settings.rounds - first + 1, final_score=final, connect_seconds=connect_seconds,
        train_seconds=total - eval_total, eval_seconds=eval_total, model_path=model_path,
        workers=len(settings.workers), absent_at_start=dict(federation.absent),
        never_contributed=[name for name in settings.workers if name not in contributed],
    )
