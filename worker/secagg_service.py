"""The worker's side of secure aggregation (docs/secagg.md): one SecAggClient per run,
its setup calls, the masked result of a secure Train, and the unmask call. Keys live in
memory only (a restarted worker re-keys); the last key epoch it advertised for each run
is kept in its --state-dir, so a restarted worker advertises a later epoch than before
and the coordinator never takes its new keys for a replay of the old."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np
import torch

from jetfed import codec
from jetfed.codec import StateDict
from jetfed.errors import WorkerStateError
from jetfed.secagg import SecAggClient, proto, update
from jetfed.secagg.errors import ProtocolViolation, SecAggConfigError
from jetfed.secagg.messages import RoundStart
from jetfed.status import echo
from jetfed.v1 import secagg_pb2

log = logging.getLogger(__name__)

EPOCHS_FILE = "secagg-epochs.json"
# Runs whose keys a worker keeps: it serves one run at a time; a few back cover a
# coordinator that resumes a run after another one.
MAX_RUNS_KEPT = 4


class EpochStore:
    """The last key epoch advertised per run, in `folder` (or in memory without one)."""

    def __init__(self, folder: Optional[Path]) -> None:
        self._path = folder / EPOCHS_FILE if folder is not None else None
        self._memory: Dict[str, int] = {}

    def last(self, run_id: str) -> int:
        return int(self._read().get(run_id, 0))

    def record(self, run_id: str, epoch: int) -> None:
        """Durably, before the epoch's keys leave the worker."""
        epochs = self._read()
        epochs[run_id] = epoch
        while len(epochs) > 64:  # oldest runs first (insertion order)
            del epochs[next(iter(epochs))]
        if self._path is None:
            self._memory = epochs
            return
        self._path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        temporary = self._path.with_suffix(".tmp")
        with open(temporary, "w") as handle:
            json.dump(epochs, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, self._path)

    def _read(self) -> Dict[str, int]:
        if self._path is None or not self._path.exists():
            return dict(self._memory)
        try:
            epochs = json.loads(self._path.read_text())
            if not isinstance(epochs, dict) or not all(isinstance(v, int) for v in epochs.values()):
                raise ValueError("not a map of run ids to epochs")
        except ValueError as exc:
            raise WorkerStateError(f"--state-dir: {self._path} is not secure aggregation's epoch file ({exc}); "
                                   "delete it (its runs' keys are gone anyway)") from None
        return epochs


class SecAggWorker:
    """A worker's secure-aggregation state for its runs, driven by the Worker service."""

    def __init__(self, name: str, folder: Optional[Path]) -> None:
        self._name = name
        self._epochs = EpochStore(folder)
        self._clients: Dict[str, SecAggClient] = {}

    def advertise(self, request: secagg_pb2.SecAggAdvertiseRequest) -> secagg_pb2.SecAggAdvertiseResponse:
        """New keys for a run (or a new mask key: `rekey`), at an epoch after every one
        this worker advertised for the run, recorded before the keys leave."""
        if not request.run_id:
            raise SecAggConfigError("run_id: secure aggregation needs the run's id")
        if not request.HasField("encoding"):
            raise SecAggConfigError("encoding: secure aggregation needs the run's fixed-point encoding")
        fixed_point = proto.encoding_from_proto(request.encoding)
        epoch = max(self._epochs.last(request.run_id) + 1, int(request.min_epoch), 1)
        if epoch > proto.MAX_NUMBER:
            raise ProtocolViolation(f"min_epoch: {request.min_epoch} is past {proto.MAX_NUMBER}")
        client = self._clients.get(request.run_id)
        if request.rekey and client is not None and client.fixed_point == fixed_point:
            client.epoch = epoch - 1
            advert = client.rekey()
        else:
            client = SecAggClient(self._name, run_id=request.run_id, fixed_point=fixed_point, epoch=epoch)
            advert = client.advertise()
        self._epochs.record(request.run_id, advert.epoch)
        self._clients.pop(request.run_id, None)
        self._clients[request.run_id] = client
        while len(self._clients) > MAX_RUNS_KEPT:
            del self._clients[next(iter(self._clients))]
        log.info("secagg run=%s keys advertised epoch=%d%s", request.run_id, advert.epoch,
                 " (re-keyed)" if request.rekey else "")
        return proto.advertisement_to_proto(advert)

    def share_keys(self, request: secagg_pb2.SecAggShareKeysRequest) -> secagg_pb2.SecAggShareKeysResponse:
        roster = proto.roster_from_proto(request.roster)
        client = self._client(roster.run_id)
        client.receive_roster(roster)
        shares = client.share_keys()
        log.info("secagg run=%s mask key shared with %d members (threshold %d)", roster.run_id, len(shares.shares),
                 roster.threshold)
        return proto.key_shares_to_proto(shares)

    def check_round(self, run_id: str, message: secagg_pb2.SecAggRoundStart, scaffold: bool) -> None:
        """At the Train header, before the weights arrive: the round can be masked."""
        if scaffold:
            raise SecAggConfigError("config.scaffold: SCAFFOLD rounds cannot be securely aggregated")
        client = self._client(run_id)
        client.receive_roster(proto.roster_from_proto(message.roster))
        client.check_round(proto.round_start_from_proto(message))

    def masked_result(self, run_id: str, message: secagg_pb2.SecAggRoundStart, base: StateDict, trained: StateDict,
                      num_examples: int, model: str) -> Tuple[codec.Manifest, codec.Payload, secagg_pb2.SecAggMaskedInput]:
        """The Train result's payload (the masked vector as one I32 tensor) and masked
        input, in the torch thread. Only the masked vector leaves: never the weights."""
        client = self._client(run_id)
        start: RoundStart = proto.round_start_from_proto(message)
        vector = update.update_vector(trained, base, update.weight_of(num_examples, message.weight_unit))
        masked = client.mask(start, vector)
        tensor = torch.from_numpy(masked.vector.view(np.int32))
        manifest, payload = codec.encode({proto.MASKED_TENSOR: tensor}, model)
        return manifest, payload, proto.masked_input_to_proto(masked)

    def unmask(self, request: secagg_pb2.SecAggUnmaskRequest) -> secagg_pb2.SecAggUnmaskResponse:
        client = self._client(request.run_id)
        response = client.unmask(proto.unmask_request_from_proto(request))
        log.info("secagg run=%s round=%d unmasked: %d shares opened, dropped=%s", request.run_id, request.round,
                 len(response.shares), ",".join(request.dropped) or "none")
        return proto.unmask_response_to_proto(response)

    def _client(self, run_id: str) -> SecAggClient:
        client = self._clients.get(run_id)
        if client is None:
            raise WorkerStateError(f"secagg: this worker holds no keys for run {echo(run_id)!r} (it restarted, or "
                                   "setup has not run); the coordinator must call SecAggAdvertise first")
        return client
