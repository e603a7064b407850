"""Where a run's first global model comes from. The coordinator holds no task code, so
it cannot build a model: it starts from a safetensors file (--init-weights, e.g.
pretrained weights converted once on a connected machine), from the checkpoint of a
resumed run, or by default from one worker's freshly built model for the run's seed
(the Worker's InitialWeights RPC). Whatever the source, the weights' tensor spec must be
the fleet's (GetInfo's model_digest) before round 1."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Tuple

import grpc
from safetensors import SafetensorError
from safetensors.torch import load as st_load

from coordinator.clients import Weights, WorkerClient
from coordinator.failures import describe_failure
from coordinator.fleet_model import FleetModel, short
from jetfed import codec
from jetfed.codec import StateDict
from jetfed.errors import InvalidConfig, JetfedError, ManifestMismatch, NonFiniteWeights

log = logging.getLogger(__name__)

SETTING = "--init-weights"


class NoInitialWeights(JetfedError):
    """No worker sent the initial weights and no file was given: the run cannot start."""

    code = grpc.StatusCode.UNAVAILABLE


@dataclass(frozen=True)
class Start:
    """A run's first weights: `model` is the model name they were saved for (a
    checkpoint's), None when the source does not say (a user's file); `source` is how
    the start line names where they came from."""

    state: StateDict
    source: str
    model: Optional[str] = None

    @property
    def digest(self) -> str:
        return codec.spec_digest(codec.spec_of(self.state))

    def problem(self, fleet: FleetModel) -> Optional[str]:
        """Why these weights cannot start the fleet's model, naming both; None if they can."""
        if self.model is not None and self.model != fleet.model:
            return (f"{self.source} holds model {self.model}, but the fleet (worker {fleet.reference}) runs "
                    f"{fleet.model}: start the boards as for the run being resumed (--model {self.model})")
        if not fleet.digest or self.digest == fleet.digest:
            return None
        problem = (f"{self.source} holds other tensors (digest {short(self.digest)}) than the fleet's model "
                   f"{fleet.model} (digest {short(fleet.digest)}, worker {fleet.reference})")
        if self.model is not None:
            return problem + ": start the boards with the --model and options of the run being resumed"
        return problem + (": write the file from the model the boards build, with their --model and options "
                          "(README 'Initial weights'; a torchvision model's tensors sit under 'net.')")


def read_file(path: Path, max_bytes: int) -> StateDict:
    """The tensors of a safetensors file, refused with one line naming the file when it
    is missing, too large, not safetensors (nothing is unpickled: safetensors holds raw
    tensor bytes), empty, of a dtype the wire cannot carry, or holds NaN or Inf."""
    where = f"{SETTING} {path}"
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise InvalidConfig(f"{where}: {size} bytes, more than the {max_bytes} a model may have here "
                                "(--max-payload-bytes)")
        data = path.read_bytes()
    except OSError as exc:
        raise InvalidConfig(f"{where}: cannot read it: {exc.strerror or exc}") from None
    try:
        state = st_load(data)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise InvalidConfig(f"{where}: not a safetensors file ({exc}); write one with safetensors.torch.save_file"
                            "(model.state_dict(), PATH), see README 'Initial weights'") from None
    if not state:
        raise InvalidConfig(f"{where}: holds no tensors")
    try:
        codec.spec_of(state)
        codec.require_finite(state, who=str(path))
    except (ManifestMismatch, NonFiniteWeights) as exc:
        raise InvalidConfig(f"{where}: {exc}") from None
    return state


async def from_a_worker(
    workers: Sequence[WorkerClient], fleet: FleetModel, seed: int, max_bytes: int, timeout: float,
) -> Tuple[Weights, str]:
    """The fleet's model built for `seed` by the first of `workers` that sends it (the
    reference worker first), and how the start line names it: equal seeds give equal
    weights on every board, so any of them will do."""
    failures = []
    for worker in workers:
        try:
            weights = await worker.initial_weights(seed, fleet.model, fleet.digest, max_bytes, timeout)
        except JetfedError as failure:
            failures.append(f"{worker.name}: {describe_failure(failure)}")
            log.warning("worker=%s initial weights failed: %s", worker.name, failures[-1])
            continue
        return weights, f"worker {worker.name}, seed {seed}"
    raise NoInitialWeights("no worker sent its initial weights (InitialWeights): " + "; ".join(failures)
                           + f". Update the boards' jetfed, or start from a file: {SETTING} FILE")
