"""A test harness, never a product flag: `python -m tests.integration.secagg_mallory
MODE_FILE worker ...` runs a real `jetfed worker` process whose secure-aggregation side
misbehaves as the first line of MODE_FILE says, read at every call (so one process
serves several tests):

- honest: as any worker;
- old: a worker older than secure aggregation (its setup RPCs answer UNIMPLEMENTED, as
  grpc's generated servicer does for a method it lacks);
- die-at-unmask: SIGKILLs itself when the unmask call arrives, i.e. between its masked
  Train reply and the unmask (the dropout that self-mask shares exist for);
- garbage-vector: sends a uniformly random vector instead of its masked update;
- garbage-shares: sends its self-mask shares all addressed to one holder;
- garbage-ciphertext: sends well-addressed self-mask shares of random bytes."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import grpc
import numpy as np
import torch

from jetfed import codec
from jetfed.secagg import proto
from worker import secagg_service
from worker.service import WorkerService

MODE_FILE = Path(sys.argv[1])


def mode() -> str:
    return MODE_FILE.read_text().strip() if MODE_FILE.exists() else "honest"


def _guard(name: str) -> None:
    honest = getattr(WorkerService, name)

    async def handler(self, request, context):
        if mode() == "old":
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not implemented!")
        if mode() == "die-at-unmask" and name == "SecAggUnmask":
            os.kill(os.getpid(), signal.SIGKILL)
        return await honest(self, request, context)

    setattr(WorkerService, name, handler)


for _name in ("SecAggAdvertise", "SecAggShareKeys", "SecAggUnmask"):
    _guard(_name)

_honest_masked_result = secagg_service.SecAggWorker.masked_result


def _masked_result(self, run_id, message, base, trained, num_examples, model):
    manifest, payload, masked = _honest_masked_result(self, run_id, message, base, trained, num_examples, model)
    if mode() == "garbage-vector":
        noise = np.random.default_rng().integers(0, 2**32, size=message.length, dtype=np.uint64).astype(np.uint32)
        manifest, payload = codec.encode({proto.MASKED_TENSOR: torch.from_numpy(noise.view(np.int32))}, model)
    elif mode() == "garbage-shares" and len(masked.self_shares) > 1:
        first = masked.self_shares[0].holder
        for share in masked.self_shares:
            share.holder = first
    elif mode() == "garbage-ciphertext":
        for share in masked.self_shares:
            share.ciphertext = os.urandom(len(share.ciphertext))
    return manifest, payload, masked


secagg_service.SecAggWorker.masked_result = _masked_result

if __name__ == "__main__":
    from jetfed.cli import main

    sys.exit(main(sys.argv[2:]))
