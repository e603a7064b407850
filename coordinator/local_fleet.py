"""In-process workers and evaluator with the gRPC clients' methods, for `jetfed
simulate`: the same round loop, strategies, screening and checkpoints as a real run,
with the training and scoring a board would do called directly instead of over the
network. One model instance serves every simulated worker (they train one at a time,
on one torch thread pool), so a thousand workers cost a thousand data partitions, not
a thousand models.

Only the simulation imports this module: it holds task code, which a real coordinator
never loads (tests/unit/test_coordinator_imports.py)."""

from __future__ import annotations

import asyncio
import dataclasses
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, List, Optional, Tuple

import torch

from coordinator.clients import Downlink, Score, Update, Weights, downlink_for, rebuild
from coordinator.failures import Failure
from jetfed import codec, compression, privacy, scaffold
from jetfed.codec import StateDict
from jetfed.codec import TensorInfo
from jetfed.config import TrainConfig
from jetfed.scaffold import ControlVariates
from jetfed.stream import DEFAULT_CHUNK_BYTES
from jetfed.scoring import task_info
from jetfed.tasks.base import Examples, Task
from jetfed.training import derive_seed
from jetfed.v1 import info_pb2

ADDRESS = "in-process"


class LocalTrainer:
    """The one model and thread the simulated services share. Work runs on a single
    thread, in the order it is asked for, so a simulation replays exactly."""

    def __init__(self, task: Task, device_label: str) -> None:
        self.task = task
        self.device_label = device_label
        self.model = task.build_model().to(task.settings.device)
        self.spec = codec.spec_of(self.model.state_dict())
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="simulate")

    async def run(self, work, *args):
        """`work(*args)` on the thread. What it raises comes out as a Failure, as from
        the gRPC client: a jetfed error by the status a board would send, any other
        as INTERNAL (coordinator.failures)."""
        try:
            return await asyncio.get_running_loop().run_in_executor(self.executor, work, *args)
        except Exception as error:
            raise Failure.of_error(error) from error

    def info(self, name: str, role: str, data: Examples) -> info_pb2.GetInfoResponse:
        return task_info(name, role, self.device_label, self.task, self.spec, data)

    def close(self) -> None:
        self.executor.shutdown(wait=True)


class LocalWorker:
    """A worker as a board runs it (worker.service.WorkerService.Train): the global
    weights loaded, the task's training with the seed derived from (seed, round, name),
    the trained state returned as the weights a board would send."""

    def __init__(self, name: str, trainer: LocalTrainer, data: Examples) -> None:
        self.name = name
        self.address = ADDRESS
        self.run_id = ""
        self.data = data
        self._trainer = trainer
        # SCAFFOLD's c_i by the round that made it, in memory (a board keeps it in
        # --state-dir): a round uses the newest from an earlier round, as the board does.
        self._controls: Dict[int, StateDict] = {}
        # Top-k's error-feedback residual by the round that left it, in memory (a board
        # keeps it in --state-dir, worker.residual), used as the board uses it.
        self._residuals: Dict[int, StateDict] = {}
        # As coordinator.clients.WorkerClient: the downlink encoding and what this
        # worker holds after its last Train (a board holds the same).
        self._downlink = compression.RAW_ENCODING
        self._holding: Optional[compression.Held] = None
        # DP-SGD's spends this run, in memory (a board keeps them in --state-dir,
        # jetfed.privacy.Ledger), refused over the budget as the board refuses them.
        self._spends: List[privacy.Spend] = []

    def _client_control(self, round_number: int, like: StateDict) -> StateDict:
        earlier = [r for r in self._controls if r < round_number]
        if not earlier:
            self._controls = {}
            return scaffold.zero_controls(like)
        newest = max(earlier)
        self._controls = {newest: self._controls[newest]}  # a re-run round's later c_i goes
        return self._controls[newest]

    def expect(self, model: str, spec: Tuple[TensorInfo, ...], max_payload_bytes: int,
               downlink: compression.Encoding = compression.RAW_ENCODING) -> None:
        """Nothing to check (the weights never leave the process); the downlink
        encoding is applied as a board's client applies it."""
        self._downlink = downlink

    async def info(self, timeout: float, wait: bool = True) -> info_pb2.GetInfoResponse:
        return self._trainer.info(self.name, "worker", self.data)

    async def initial_weights(self, seed: int, model: str, digest: str, max_bytes: int, timeout: float) -> Weights:
        return await self._trainer.run(self._initial_weights, seed)

    def _initial_weights(self, seed: int) -> Weights:
        """As a worker builds them: torch seeded, the model built on the CPU."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            state = self._trainer.task.build_model().state_dict()
        return Weights.of(state, self._trainer.task.model_name)

    async def keep_initial(self, seed: int, weights: Weights, timeout: float) -> bool:
        """As WorkerClient.keep_initial: this worker builds the seeded model itself and,
        when it is `weights`, round 1 sends it an empty delta."""
        built = await self._trainer.run(self._initial_weights, seed)
        if built.manifest.sha256 != weights.manifest.sha256:
            return False
        self._holding = weights.held()
        return True

    async def train(self, round_number: int, config: TrainConfig, weights: Weights, timeout: float) -> Update:
        sending = downlink_for(weights, self._holding, self._downlink, DEFAULT_CHUNK_BYTES)
        self._holding = None
        update = await self._trainer.run(self._train, round_number, config, weights, sending)
        self._holding = sending.holding
        return update

    def _train(self, round_number: int, config: TrainConfig, weights: Weights, sending: Downlink) -> Update:
        """What a board does with what its client sends (worker.service.WorkerService.Train),
        and what the client rebuilds of its answer (coordinator.clients.rebuild)."""
        trainer = self._trainer
        held = sending.holding.state
        state, server_control = scaffold.split_controls(held) if config.scaffold else (held, None)
        trainer.model.load_state_dict(state)
        extra: Dict[str, Any] = {}  # Task.train's keywords: controls, private_seed
        if server_control is not None:
            extra["controls"] = ControlVariates(server_control, self._client_control(round_number, server_control))
        seed = derive_seed(config.seed, round_number, self.name)
        spend = self._check_budget(round_number, config) if config.private else None
        if spend is not None and privacy.takes_private_seed(trainer.task):
            extra["private_seed"] = privacy.private_seed(seed)  # a simulation replays
        outcome = trainer.task.train(trainer.model, self.data, config, seed, **extra)
        epsilon = 0.0
        if spend is not None:
            if not outcome.private:
                raise privacy.PrivacyUnavailable(f"config.noise_multiplier: task {trainer.task.name}'s own training "
                                                 "loop does not apply DP-SGD")
            self._spends.append(spend)
            epsilon = privacy.epsilon_of(self._spends, config.dp_delta)
        if outcome.client_control is not None:
            self._controls[round_number] = outcome.client_control
        trained_state = {name: tensor.detach().to("cpu", copy=True) for name, tensor in outcome.state.items()}
        manifest, payload, received = self._result(round_number, config, trained_state, state, sending.holding.id)
        model = trainer.task.model_name
        trained = rebuild(manifest, payload, received, sending.holding, weights, codec.spec_of(trained_state), model,
                          self.name)
        return Update(worker=self.name, weights=trained,
                      num_examples=outcome.num_examples, mean_loss=outcome.mean_loss,
                      train_seconds=outcome.seconds, device=trainer.device_label,
                      bytes_down=sending.manifest.total_bytes, bytes_up=manifest.total_bytes,
                      raw_down=weights.manifest.total_bytes, raw_up=trained.manifest.total_bytes,
                      epsilon=epsilon, delta=config.dp_delta if epsilon else 0.0)

    def _check_budget(self, round_number: int, config: TrainConfig) -> privacy.Spend:
        """The round's spend, refused (as a board refuses it) over the budget."""
        privacy.require_library()
        spend = privacy.round_spend(round_number, config, len(self.data))
        privacy.within_budget(self._spends, spend, config, "this run")
        return spend

    def _result(self, round_number: int, config: TrainConfig, trained: StateDict, base: StateDict,
                base_id: str) -> Tuple[codec.Manifest, codec.Payload, StateDict]:
        """The result a board sends (config.uplink_encoding), with the tensors its
        payload holds: the same encoding and top-k residual as worker.service's."""
        model = self._trainer.task.model_name
        encoding = compression.Encoding.parse(config.uplink_encoding)
        if encoding.is_raw:
            manifest, payload = codec.encode(trained, model)
            return manifest, payload, trained
        owed = None
        earlier = [r for r in self._residuals if r < round_number]
        if encoding.kind == compression.TOPK and earlier:
            owed = self._residuals[max(earlier)]
        encoded = compression.encode_delta(trained, base, encoding, owed)
        if encoded.residual is not None:
            self._residuals = {max(earlier): self._residuals[max(earlier)]} if earlier else {}
            self._residuals[round_number] = encoded.residual
        manifest, payload = codec.encode(encoded.payload, model)
        manifest = dataclasses.replace(manifest, content=compression.DELTA, encoding=encoding.kind,
                                       topk_fraction=encoding.fraction, base_sha256=base_id, base_round=round_number)
        return manifest, payload, encoded.payload

    async def release(self) -> None:
        """No connection to close: the worker is in this process."""

    async def end_run(self, timeout: float) -> bool:
        return True

    async def close(self) -> None:
        """Nothing held per worker."""


class LocalEvaluator:
    """The evaluator's Evaluate on the test set, in process."""

    def __init__(self, name: str, trainer: LocalTrainer, data: Examples, batch_size: int = 500) -> None:
        self.name = name
        self.address = ADDRESS
        self.data = data
        self._trainer = trainer
        self._batch_size = batch_size

    async def info(self, timeout: float) -> info_pb2.GetInfoResponse:
        return self._trainer.info(self.name, "evaluator", self.data)

    async def evaluate(self, tag: str, weights: Weights, timeout: float) -> Score:
        return await self._trainer.run(self._evaluate, weights)

    def _evaluate(self, weights: Weights) -> Score:
        trainer = self._trainer
        trainer.model.load_state_dict(weights.state)
        result = trainer.task.evaluate(trainer.model, self.data, self._batch_size)
        return Score(result.correct, result.total, result.loss, tuple(result.predicted_counts), dict(result.metrics))

    async def close(self) -> None:
        """Nothing held."""


def subset(examples: Examples, keep: torch.Tensor) -> Optional[Examples]:
    """The examples at `keep` when they live in memory as tensors (sharing one load of
    the data set among many simulated workers), else None: load them per worker."""
    from jetfed.tasks.base import TensorExamples

    if not isinstance(examples, TensorExamples):
        return None
    return examples.subset(keep)
