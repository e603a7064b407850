"""Prometheus metrics: every RPC by method and final status, weight bytes on the wire,
and the coordinator's rounds. Each Telemetry owns its registry, so several services (or
tests) in one process never collide on counters.

A Telemetry always exists: building one costs a registry and a few metric objects,
recording a sample a lock and an addition. Without a metrics port a service never calls
`start_http`, and no code path asks "are metrics on?"."""

from __future__ import annotations

import contextlib
import inspect
import logging
import re
import time
from typing import Any, Awaitable, Callable, Dict, Iterator, List, Mapping, Optional

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from jetfed.handlers import rebuild_handler
from jetfed.errors import AddressInUse

log = logging.getLogger(__name__)

# 1 ms (a health check on a LAN) to 10 min (a ResNet round on a board); more is +Inf.
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                    1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
ROUND_OUTCOMES = ("completed", "failed")
# Evaluation metrics are named by the task, so their label values are bounded here: a
# task reporting the recall of each of 1,000 classes must not mint 1,000 series per model
# and round. Kept: loss and accuracy, then the others by name, up to the cap; a name is
# cut to MAX_METRIC_NAME characters and any character outside [A-Za-z0-9_:/.-] becomes _.
MAX_METRICS_PER_MODEL = 64
MAX_METRIC_NAME = 64
_METRIC_NAME_REFUSED = re.compile(r"[^A-Za-z0-9_:/.\-]")
# grpcio < 1.60 answers context.code() with the core's integer, later ones with the enum.
_CODES = {code.value[0]: code for code in grpc.StatusCode}


class Telemetry:
    """The metrics of one service; record through the methods, scrape via `start_http`."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self._rpcs = Counter("jetfed_rpcs", "RPCs handled, by final status code",
                             ["service", "method", "code"], registry=r)
        self._rpc_seconds = Histogram("jetfed_rpc_seconds", "Time from an RPC's start to its final status",
                                      ["service", "method"], buckets=DURATION_BUCKETS, registry=r)
        self._errors = Counter("jetfed_errors", "RPCs that ended with a status other than OK",
                               ["method", "code"], registry=r)
        self._received = Counter("jetfed_weight_bytes_received", "Weight chunk bytes read from streams",
                                 ["method"], registry=r)
        self._sent = Counter("jetfed_weight_bytes_sent", "Weight chunk bytes handed to streams",
                             ["method"], registry=r)
        self._http: Optional[Any] = None

    def observe_rpc(self, full_method: str, code: grpc.StatusCode, seconds: float) -> None:
        """`full_method` as gRPC names it: /package.Service/Method."""
        service, _, method = full_method.lstrip("/").rpartition("/")
        self._rpcs.labels(service, method, code.name).inc()
        self._rpc_seconds.labels(service, method).observe(seconds)
        if code is not grpc.StatusCode.OK:
            self._errors.labels(method, code.name).inc()

    def add_bytes_received(self, method: str, n: int) -> None:
        self._received.labels(method).inc(n)

    def add_bytes_sent(self, method: str, n: int) -> None:
        self._sent.labels(method).inc(n)

    def on_bytes_received(self, method: str) -> Callable[[int], None]:
        """Per-chunk callbacks for wire.read_weight_stream and wire.weight_messages; the
        label is resolved once per stream, not once per chunk."""
        return self._received.labels(method).inc

    def on_bytes_sent(self, method: str) -> Callable[[int], None]:
        return self._sent.labels(method).inc

    def start_http(self, host: str, port: int, setting: str = "--metrics-port") -> int:
        """Serve /metrics from a daemon thread; returns the bound port (`port=0` picks one).
        Needs prometheus-client >= 0.20, the first to return the server it starts. A taken
        port raises AddressInUse naming `setting`."""
        try:
            self._http, _ = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            raise AddressInUse(
                f"{setting}: cannot serve metrics on {host}:{port}: {exc.strerror or exc}; "
                f"stop the process holding it or choose another {setting}"
            ) from exc
        return int(self._http.server_port)

    def stop_http(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


class RunTelemetry(Telemetry):
    """The coordinator's metrics: a Telemetry plus the run's rounds, apart so that a
    worker's scrape shows no current_round of 0."""

    def __init__(self) -> None:
        super().__init__()
        r = self.registry
        self._rounds = Counter("jetfed_rounds", "Federation rounds by outcome", ["outcome"], registry=r)
        self._round_seconds = Histogram("jetfed_round_seconds", "Wall time of a round, training to checkpoint",
                                        buckets=DURATION_BUCKETS, registry=r)
        self._train_seconds = Histogram("jetfed_train_seconds", "A worker's Train call as the coordinator saw it",
                                        ["worker"], buckets=DURATION_BUCKETS, registry=r)
        self._evaluate_seconds = Histogram("jetfed_evaluate_seconds", "Scoring one model (an update or global)",
                                           ["model"], buckets=DURATION_BUCKETS, registry=r)
        self._contributing = Gauge("jetfed_workers_contributing", "Updates averaged in the last round", registry=r)
        self._round = Gauge("jetfed_current_round", "The round being trained", registry=r)
        self._evaluation = Gauge("jetfed_evaluation_metric",
                                 "The task's metrics of each model scored in the last evaluated round",
                                 ["model", "metric"], registry=r)
        self._evaluated_round = Gauge("jetfed_evaluated_round", "The round jetfed_evaluation_metric is from",
                                      registry=r)
        self._update_bytes = Counter(
            "jetfed_update_bytes", "Weight payload bytes of Train calls as they crossed the wire, by worker and "
            "direction (sent: the model to the worker; received: its update)", ["worker", "direction"], registry=r)
        self._update_raw_bytes = Counter(
            "jetfed_update_raw_bytes", "What jetfed_update_bytes would have been as full raw weights",
            ["worker", "direction"], registry=r)
        self._compression_ratio = Gauge(
            "jetfed_compression_ratio", "A worker's last Train: full raw bytes both ways over the bytes that crossed",
            ["worker"], registry=r)
        self._epsilon = Gauge(
            "jetfed_dp_epsilon", "DP-SGD: a worker's cumulative epsilon for the run at --dp-delta, as its accountant "
            "reported it with its last update in a committed round (or version); absent without DP",
            ["worker"], registry=r)
        self._capped_warned = False

    def observe_traffic(self, worker: str, sent: int, received: int, raw_sent: int, raw_received: int) -> None:
        """One Train's weight bytes each way, as they crossed and as full raw weights."""
        self._update_bytes.labels(worker, "sent").inc(sent)
        self._update_bytes.labels(worker, "received").inc(received)
        self._update_raw_bytes.labels(worker, "sent").inc(raw_sent)
        self._update_raw_bytes.labels(worker, "received").inc(raw_received)
        if sent + received:
            self._compression_ratio.labels(worker).set((raw_sent + raw_received) / (sent + received))

    def set_epsilon(self, epsilons: Mapping[str, float]) -> None:
        """A committed round's contributors' cumulative epsilons; the other workers keep
        theirs (a worker's epsilon only grows with the rounds it trains)."""
        for worker, epsilon in epsilons.items():
            self._epsilon.labels(worker).set(epsilon)

    def observe_round(self, seconds: float, outcome: str) -> None:
        """`outcome` is one of ROUND_OUTCOMES; anything else is a bug, not a new series."""
        if outcome not in ROUND_OUTCOMES:
            raise ValueError(f"outcome: {outcome!r} is not one of {', '.join(ROUND_OUTCOMES)}")
        self._rounds.labels(outcome).inc()
        self._round_seconds.observe(seconds)

    def observe_train(self, worker: str, seconds: float) -> None:
        self._train_seconds.labels(worker).observe(seconds)

    def observe_evaluate(self, model: str, seconds: float) -> None:
        self._evaluate_seconds.labels(model).observe(seconds)

    def set_workers_contributing(self, count: int) -> None:
        self._contributing.set(count)

    def set_round(self, round_number: int) -> None:
        self._round.set(round_number)

    def set_evaluation(self, round_number: int, metrics: Mapping[str, Mapping[str, float]]) -> None:
        """The metrics of each model scored in `round_number`, by model ("global" or a
        worker's name, so bounded by the fleet): they replace the previous round's, so an
        update not scored this time shows no stale values."""
        self._evaluation.clear()
        for model, values in metrics.items():
            kept = bounded_metrics(values)
            if len(kept) < len(values) and not self._capped_warned:
                self._capped_warned = True
                log.warning("jetfed_evaluation_metric keeps %d of the %d metrics of model %s (at most %d a model)",
                            len(kept), len(values), model, MAX_METRICS_PER_MODEL)
            for name, value in kept.items():
                self._evaluation.labels(model, name).set(value)
        self._evaluated_round.set(round_number)


def metric_label(name: str) -> str:
    """A task's metric name as a label value: bounded length, a plain character set."""
    return _METRIC_NAME_REFUSED.sub("_", name[:MAX_METRIC_NAME]) or "_"


def bounded_metrics(values: Mapping[str, float]) -> Dict[str, float]:
    """At most MAX_METRICS_PER_MODEL of `values` under their label names: loss and
    accuracy first, then the others in name order."""
    order: List[str] = sorted(values, key=lambda name: (name not in ("loss", "accuracy"), name != "loss", name))
    kept: Dict[str, float] = {}
    for name in order:
        label = metric_label(name)
        if label not in kept and len(kept) < MAX_METRICS_PER_MODEL:
            kept[label] = float(values[name])
    return kept


def _status(context: Any, default: grpc.StatusCode) -> grpc.StatusCode:
    """The code the servicer set or aborted with; `default` if none (a sync context has no code())."""
    code = getattr(context, "code", lambda: None)()
    code = _CODES.get(code) if isinstance(code, int) else code
    return code if isinstance(code, grpc.StatusCode) else default


@contextlib.contextmanager
def _observed(telemetry: Telemetry, method: str, context: Any) -> Iterator[None]:
    """Time the body and count its final status the way grpc.aio decides it: abort's code;
    CANCELLED when the task is cancelled or the response generator closed early; a raised
    exception is UNKNOWN unless the servicer set another code first."""
    started = time.perf_counter()
    code = grpc.StatusCode.UNKNOWN
    try:
        yield
        code = _status(context, grpc.StatusCode.OK)
    except Exception:
        code = _status(context, grpc.StatusCode.UNKNOWN)
        if code is grpc.StatusCode.OK:
            code = grpc.StatusCode.UNKNOWN
        raise
    except BaseException:
        code = grpc.StatusCode.CANCELLED
        raise
    finally:
        telemetry.observe_rpc(method, code, time.perf_counter() - started)


class RpcMetricsInterceptor(grpc.aio.ServerInterceptor):
    """Counts and times every RPC the server resolves. An aio interceptor gets no servicer
    context, so it returns the handler rebuilt around a wrapped behaviour of the same kind
    (gRPC tells a yielding stream handler from a writing one by inspecting it).

    Put it first in the server's interceptors, so what later ones refuse is counted too.
    Unknown methods are not counted: a scanner must not mint new label values."""

    def __init__(self, telemetry: Telemetry) -> None:
        self._telemetry = telemetry

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Optional[grpc.RpcMethodHandler]:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        return rebuild_handler(handler, lambda behaviour: self._wrap(behaviour, method, handler.response_streaming))

    def _wrap(self, behaviour: Callable, method: str, response_streaming: bool) -> Callable:
        telemetry = self._telemetry
        if inspect.isasyncgenfunction(behaviour):
            async def yielding(request_or_iterator: Any, context: Any) -> Any:
                responses = behaviour(request_or_iterator, context)
                # Closed now, not when collected, so the servicer's `async with` (Train's lock) exits.
                with _observed(telemetry, method, context):
                    try:
                        async for response in responses:
                            yield response
                    finally:
                        await responses.aclose()
            return yielding
        if inspect.iscoroutinefunction(behaviour):
            async def awaiting(request_or_iterator: Any, context: Any) -> Any:
                with _observed(telemetry, method, context):
                    return await behaviour(request_or_iterator, context)
            return awaiting
        if response_streaming:
            def iterating(request_or_iterator: Any, context: Any) -> Any:
                with _observed(telemetry, method, context):
                    yield from behaviour(request_or_iterator, context)
            return iterating

        def calling(request_or_iterator: Any, context: Any) -> Any:
            with _observed(telemetry, method, context):
                return behaviour(request_or_iterator, context)
        return calling
