"""The round loop: send the global model to every worker at once, average what comes
back, score on schedule. Transport lives in clients, arithmetic in fedavg, output in
report; this module only sequences them."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Dict, List, Optional

import grpc
import torch
from safetensors.torch import save_file

from coordinator import report
from coordinator.clients import EvaluatorClient, Score, Update, Weights, WorkerClient
from coordinator.fedavg import fedavg
from coordinator.settings import RunSettings
from jetfed import codec
from jetfed.errors import JetfedError
from jetfed.models import build_model

log = logging.getLogger(__name__)

Say = Callable[[str], None]


class RunFailed(JetfedError):
    """A round ended with no update to average; the global model is left as it was."""


@dataclass(frozen=True)
class RunSummary:
    rounds: int
    final_score: Optional[Score]
    connect_seconds: float
    train_seconds: float
    eval_seconds: float
    model_path: Path


def describe_failure(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    if isinstance(exc, JetfedError):
        return f"{exc.code.name}: {exc}"
    return f"{type(exc).__name__}: {exc}"


def save_model(weights: Weights, path: Path, round_number: int) -> None:
    """Write then rename, so the file on disk is always a whole model."""
    partial = path.with_name(path.name + ".partial")
    save_file(
        {name: t.contiguous() for name, t in weights.state.items()}, str(partial),
        metadata={"model": weights.manifest.model, "round": str(round_number)},
    )
    partial.replace(path)


class Federation:
    def __init__(self, settings: RunSettings, say: Say = print) -> None:
        self.settings = settings
        self._say = say
        torch.manual_seed(settings.train.seed)
        initial = build_model(settings.model).state_dict()
        self._spec = codec.spec_of(initial)
        self.global_weights = Weights.of(initial, settings.model)
        self.workers = [
            WorkerClient(name, address, settings.model, self._spec, settings.chunk_bytes, settings.max_payload_bytes)
            for name, address in settings.workers.items()
        ]
        self.evaluator = EvaluatorClient(settings.evaluator, settings.chunk_bytes) if settings.evaluator else None
        self._groups: List[report.LabelGroup] = []
        self._updates: List[Update] = []

    async def connect(self) -> None:
        """Wait for every service, and learn which digits each worker holds."""
        timeout = self.settings.connect_timeout
        answers = await asyncio.gather(*(w.info(timeout) for w in self.workers), return_exceptions=True)
        unreachable = {w.name: describe_failure(a) for w, a in zip(self.workers, answers) if isinstance(a, Exception)}
        if unreachable:
            raise RunFailed(f"workers not reachable within {timeout:.0f}s: {unreachable}")
        infos = list(answers)
        for worker, info in zip(self.workers, infos):
            if info.model != self.settings.model:
                raise RunFailed(f"worker {worker.name} serves model {info.model!r}, this run trains {self.settings.model!r}")
            log.info("worker=%s address=%s device=%s examples=%d", worker.name, worker.address, info.device, info.dataset_size)
        self._groups = report.label_groups([list(info.label_counts) for info in infos])
        if self.evaluator:
            try:
                info = await self.evaluator.info(timeout)
            except grpc.aio.AioRpcError as exc:
                raise RunFailed(f"evaluator at {self.evaluator.address} not reachable: {describe_failure(exc)}") from exc
            if info.model != self.settings.model:
                raise RunFailed(f"evaluator serves model {info.model!r}, this run trains {self.settings.model!r}")
            log.info("evaluator address=%s device=%s examples=%d", self.evaluator.address, info.device, info.dataset_size)

    async def train_round(self, round_number: int) -> Dict[str, object]:
        settings = self.settings
        config = replace(settings.train, lr=settings.lr_for(round_number))
        results = await asyncio.gather(
            *(w.train(round_number, config, self.global_weights, settings.rpc_timeout) for w in self.workers),
            return_exceptions=True,
        )
        updates: List[Update] = []
        failed: Dict[str, str] = {}
        for worker, result in zip(self.workers, results):
            if isinstance(result, Update):
                updates.append(result)
            elif isinstance(result, Exception):
                failed[worker.name] = describe_failure(result)
                log.warning("round=%d worker=%s failed: %s", round_number, worker.name, failed[worker.name])
            else:
                raise result
        if not updates:
            raise RunFailed(f"round {round_number}: every worker failed: {failed}")
        weights = [u.num_examples if settings.weighting == "examples" else 1.0 for u in updates]
        self._updates = updates
        self.global_weights = Weights.of(fedavg([u.weights.state for u in updates], weights), settings.model)
        return {
            "round": round_number,
            "lr": config.lr,
            "workers": [u.worker for u in updates],
            "failed": failed,
            "updates": {
                u.worker: {"num_examples": u.num_examples, "mean_loss": u.mean_loss,
                           "train_seconds": u.train_seconds, "device": u.device}
                for u in updates
            },
        }

    async def evaluate_round(self) -> Dict[str, object]:
        """Score every update, then the new global model, printed in the reference's order."""
        assert self.evaluator is not None
        timeout = self.settings.rpc_timeout
        tagged = [(u.worker, f"Model update {u.worker}", u.weights) for u in self._updates]
        tagged.append(("global", "Federated model", self.global_weights))
        self._say("Evaluating models")
        scores = await asyncio.gather(*(self.evaluator.evaluate(key, w, timeout) for key, _, w in tagged))
        for (_, who, _), score in zip(tagged, scores):
            self._say(report.share_line(who, score, self._groups))
            self._say(report.score_line(who, score))
        return {key: score for (key, _, _), score in zip(tagged, scores)}

    async def close(self) -> None:
        for worker in self.workers:
            await worker.close()
        if self.evaluator:
            await self.evaluator.close()


async def run(settings: RunSettings, say: Say = print) -> RunSummary:
    settings.out_dir.mkdir(parents=True, exist_ok=True)
    federation = Federation(settings, say)
    metrics = report.MetricsLog(settings.out_dir / "metrics.jsonl")
    model_path = settings.out_dir / "model.safetensors"
    train_total = eval_total = 0.0
    final: Optional[Score] = None
    try:
        started = time.perf_counter()
        await federation.connect()
        connect_seconds = time.perf_counter() - started
        for round_number in range(1, settings.rounds + 1):
            say(f"Training round {round_number}/{settings.rounds}")
            round_started = time.perf_counter()
            record = await federation.train_round(round_number)
            train_seconds = time.perf_counter() - round_started
            train_total += train_seconds
            record["train_s"] = train_seconds
            if federation.evaluator and settings.evaluates(round_number):
                eval_started = time.perf_counter()
                try:
                    scores = await federation.evaluate_round()
                    record["evaluation"] = {key: report.score_record(s) for key, s in scores.items()}
                    final = scores["global"] if round_number == settings.rounds else final
                except (grpc.aio.AioRpcError, JetfedError) as exc:
                    record["evaluation_error"] = describe_failure(exc)
                    log.warning("round=%d evaluation failed: %s", round_number, record["evaluation_error"])
                record["eval_s"] = time.perf_counter() - eval_started
                eval_total += record["eval_s"]
            record["duration_s"] = time.perf_counter() - round_started
            metrics.write(record)
        save_model(federation.global_weights, model_path, settings.rounds)
    finally:
        metrics.close()
        await federation.close()
    return RunSummary(settings.rounds, final, connect_seconds, train_total, eval_total, model_path)
