"""The round loop: send the global model to the workers at once, average what comes
back in time, score on schedule, checkpoint. Transport lives in clients, arithmetic in
fedavg, backoff in roster, persistence in checkpoint, output in report; this module
only sequences them."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, replace
from typing import Any, Callable, Dict, List, Optional

import grpc
import torch

from coordinator import report
from coordinator.board import RunBoard
from coordinator.clients import EvaluatorClient, Score, Update, Weights, WorkerClient
from coordinator.fedavg import fedavg
from coordinator.roster import Roster
from coordinator.settings import RunSettings
from jetfed import codec, tls
from jetfed.auth import bearer_metadata
from jetfed.config import TrainConfig
from jetfed.errors import JetfedError
from jetfed.models import build_model
from jetfed.telemetry import RunTelemetry
from jetfed.v1 import info_pb2

log = logging.getLogger(__name__)

Say = Callable[[str], None]


class RunFailed(JetfedError):
    """The run cannot go on (a round missed its quorum on every attempt, or the fleet
    never came up); the last checkpoint is intact for --resume."""


@dataclass(frozen=True)
class RunSummary:
    rounds: int  # run by this process (fewer than the run's after --resume)
    final_score: Optional[Score]
    connect_seconds: float
    train_seconds: float
    eval_seconds: float
    model_path: Any


def describe_failure(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    if isinstance(exc, JetfedError):
        return f"{exc.code.name}: {exc}"
    return f"{type(exc).__name__}: {exc}"


class Federation:
    def __init__(
        self, settings: RunSettings, say: Say = print, board: Optional[RunBoard] = None,
        telemetry: Optional[RunTelemetry] = None,
    ) -> None:
        self.settings = settings
        self._say = say
        self.telemetry = telemetry or RunTelemetry()
        torch.manual_seed(settings.train.seed)
        initial = build_model(settings.model).state_dict()
        self._spec = codec.spec_of(initial)
        self.global_weights = Weights.of(initial, settings.model)
        credentials = settings.tls.channel_credentials() if settings.tls else None
        if credentials is None:
            tls.warn_plaintext(log, "the coordinator's calls to the fleet")
        metadata = bearer_metadata(settings.token)
        self.workers = {
            name: WorkerClient(
                name, address, settings.model, self._spec, settings.chunk_bytes, settings.max_payload_bytes,
                credentials, metadata, self.telemetry,
            )
            for name, address in settings.workers.items()
        }
        self.roster = Roster(settings.workers, max_backoff=settings.max_backoff)
        self.board = board or RunBoard.for_workers(settings.rounds, str(settings.out_dir), settings.workers)
        self.evaluator = (
            EvaluatorClient(settings.evaluator, settings.chunk_bytes, credentials, metadata, self.telemetry)
            if settings.evaluator else None
        )
        self._infos: Dict[str, info_pb2.GetInfoResponse] = {}
        self._updates: List[Update] = []

    def restore(self, state: codec.StateDict) -> None:
        manifest, _ = codec.encode(state, self.settings.model)
        codec.check_manifest(manifest, self.settings.model, self._spec)
        self.global_weights = Weights.of(state, self.settings.model)

    async def connect(self) -> None:
        """Wait for the fleet; a quorum of workers must answer, the rest are retried
        in the rounds with backoff. Learns which digits each worker holds."""
        timeout = self.settings.connect_timeout
        answers = await asyncio.gather(*(w.info(timeout) for w in self.workers.values()), return_exceptions=True)
        for name, answer in zip(self.workers, answers):
            if isinstance(answer, BaseException):
                self.roster.failed(name, describe_failure(answer))
                log.warning("worker=%s unreachable at start: %s", name, describe_failure(answer))
                continue
            if answer.model != self.settings.model:
                raise RunFailed(f"worker {name} serves model {answer.model!r}, this run trains {self.settings.model!r}")
            self._infos[name] = answer
            log.info("worker=%s address=%s device=%s examples=%d", name, self.workers[name].address,
                     answer.device, answer.dataset_size)
        if len(self._infos) < self.settings.quorum:
            raise RunFailed(
                f"only {len(self._infos)} of {len(self.workers)} workers answered within {timeout:.0f}s, "
                f"the quorum is {self.settings.quorum}: "
                + "; ".join(f"{n}: {self.roster.record(n).last_error}" for n in self.workers if n not in self._infos)
            )
        if self.evaluator:
            try:
                info = await self.evaluator.info(timeout)
            except grpc.aio.AioRpcError as exc:
                log.warning("evaluator at %s unreachable at start (%s); training goes on, evaluations will be tried on schedule",
                            self.evaluator.address, describe_failure(exc))
                return
            if info.model != self.settings.model:
                raise RunFailed(f"evaluator serves model {info.model!r}, this run trains {self.settings.model!r}")
            log.info("evaluator address=%s device=%s examples=%d", self.evaluator.address, info.device, info.dataset_size)

    async def _attempt(self, round_number: int, names: List[str], record: Dict[str, Any]) -> List[Update]:
        settings = self.settings
        config = replace(settings.train, lr=settings.lr_for(round_number))
        self.board.start_round(round_number, names)
        results = await asyncio.gather(*(self._train(n, round_number, config) for n in names), return_exceptions=True)
        updates = []
        for name, result in zip(names, results):
            if isinstance(result, Update):
                updates.append(result)
                self.roster.succeeded(name, round_number)
                self.board.worker_done(name, round_number, result.train_seconds, result.mean_loss)
                record["failed"].pop(name, None)
                continue
            if not isinstance(result, Exception):
                raise result
            reason = describe_failure(result)
            if isinstance(result, grpc.aio.AioRpcError) and result.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                record["late"].append(name)
            record["failed"][name] = reason
            delay = self.roster.failed(name, reason)
            self.board.worker_failed(name, reason)
            log.warning("round=%d worker=%s status=%s retry_in=%.1fs", round_number, name, reason, delay)
        return updates

    async def _train(self, name: str, round_number: int, config: TrainConfig) -> Update:
        """One worker's Train, timed as the coordinator sees it (both transfers included);
        a failed call is not a training time."""
        started = time.perf_counter()
        update = await self.workers[name].train(round_number, config, self.global_weights, self.settings.round_timeout)
        self.telemetry.observe_train(name, time.perf_counter() - started)
        return update

    async def train_round(self, round_number: int) -> Dict[str, Any]:
        """One round: every due worker trains; the updates that arrive within the round's
        deadline are averaged if they reach the quorum. Otherwise the round is tried
        again (everyone asked, the global model untouched) up to --round-retries times."""
        settings = self.settings
        record: Dict[str, Any] = {"round": round_number, "lr": settings.lr_for(round_number), "failed": {}, "late": []}
        for attempt in range(1, settings.round_retries + 2):
            names = self.roster.due(everyone=attempt > 1)
            record["skipped"] = [n for n in self.roster.names if n not in names]
            updates = await self._attempt(round_number, names, record)
            if len(updates) >= settings.quorum:
                break
            if attempt <= settings.round_retries:
                pause = min(0.5 * 2 ** (attempt - 1), settings.max_backoff)
                log.warning("round=%d attempt=%d quorum not met: %d of %d updates; retrying in %.1fs",
                            round_number, attempt, len(updates), settings.quorum, pause)
                await asyncio.sleep(pause)
        else:
            raise RunFailed(
                f"round {round_number}: {len(updates)} updates after {settings.round_retries + 1} attempts, "
                f"the quorum is {settings.quorum}: {record['failed']}"
            )
        weights = [u.num_examples if settings.weighting == "examples" else 1.0 for u in updates]
        self._updates = updates
        self.global_weights = Weights.of(fedavg([u.weights.state for u in updates], weights), settings.model)
        record.update({
            "attempts": attempt,
            "workers": [u.worker for u in updates],
            "updates": {
                u.worker: {"num_examples": u.num_examples, "mean_loss": u.mean_loss,
                           "train_seconds": u.train_seconds, "device": u.device}
                for u in updates
            },
        })
        return record

    async def _label_groups(self) -> List[report.LabelGroup]:
        """Groups of the workers known so far; one that was down at start is asked now."""
        for name in self.roster.names:
            if name not in self._infos:
                try:
                    self._infos[name] = await self.workers[name].info(timeout=2.0, wait=False)
                except grpc.aio.AioRpcError:
                    pass
        return report.label_groups([list(self._infos[n].label_counts) for n in self.roster.names if n in self._infos])

    async def evaluate_round(self) -> Dict[str, Score]:
        """Score every update, then the new global model, printed in the reference's order."""
        assert self.evaluator is not None
        timeout = self.settings.eval_timeout
        tagged = [(u.worker, f"Model update {u.worker}", u.weights) for u in self._updates]
        tagged.append(("global", "Federated model", self.global_weights))
        groups = await self._label_groups()
        self._say("Evaluating models")
        scores = await asyncio.gather(*(self._evaluate(key, w, timeout) for key, _, w in tagged))
        for (_, who, _), score in zip(tagged, scores):
            self._say(report.share_line(who, score, groups))
            self._say(report.score_line(who, score))
        self.board.evaluated(self.board.round, [
            (key, s.accuracy, s.loss, s.correct, s.total) for (key, _, _), s in zip(tagged, scores)
        ])
        return {key: score for (key, _, _), score in zip(tagged, scores)}

    async def _evaluate(self, key: str, weights: Weights, timeout: float) -> Score:
        assert self.evaluator is not None
        started = time.perf_counter()
        score = await self.evaluator.evaluate(key, weights, timeout)
        self.telemetry.observe_evaluate(key, time.perf_counter() - started)
        return score

    async def close(self) -> None:
        for worker in self.workers.values():
            await worker.close()
        if self.evaluator:
            await self.evaluator.close()
