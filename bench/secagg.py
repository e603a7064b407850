"""CPU cost of each secure-aggregation stage (jetfed/secagg, docs/secagg.md), per worker
and for the coordinator, for jetfed's models and fleets of N workers, in one process.

For each model (its floating-point state, as jetfed.models builds it) and each N:
- setup: a worker's key generation, roster check and sealed Shamir shares of its mask
  key for N-1 peers; the coordinator's checks of N advertisements and N share sets.
- mask: one real worker's `mask()`: fixed-point encoding, its self-mask and N-1
  pairwise ChaCha20 masks, and its sealed self-mask shares (the upload riding on Train).
- unmask: one worker opening its shares of a round in which one peer dropped.
- coordinator: collecting N masked inputs (checks and running sum), closing the stage,
  taking N-1 unmask responses, and `finish()` (Shamir reconstruction, N self-masks off,
  and with one worker dropped, its N-1 pairwise masks off too).
The coordinator is timed against peers that are this file's harness (a SecAggClient
subclass masking only with the worker that drops), so that N workers' own masking,
N x (N-1) PRG expansions that run on N boards, does not run here; pairs between two
survivors cancel, so the coordinator's work and the decoded sum are what the real
protocol gives (each round's sum is checked bit for bit against the plaintext).
Bytes: what the protocol adds to messages (ciphertexts, commitments), not the vector.

    nice -n 15 .venv/bin/python bench/secagg.py [--models mnist-cnn,resnet18] [--workers 3,10,100]

Figures of 2026-11-27 (one shared AMD EPYC core, busy; CPU seconds) are in docs/secagg.md
("Cost"): mnist-cnn N=3, worker mask 0.015 s and coordinator finish 0.011 s;
resnet18 N=100, worker mask 3.9 s and coordinator finish 3.8 s (7.6 s with one dropped).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from typing import Dict, Iterable, List, Tuple

import numpy as np

from jetfed.secagg import FixedPoint, SecAggClient, SecAggServer, keys

RUN = "bench"


class OnlyWithDropper(SecAggClient):
    """A worker that masks only with `dropper`: the pairwise masks the coordinator must
    remove when `dropper` drops; masks between two survivors would cancel anyway."""

    dropper = ""

    def _pairwise_peers(self, participants: Tuple[str, ...]) -> Tuple[str, ...]:
        return tuple(p for p in participants if p == self.dropper and p != self.worker)


def model_length(name: str) -> int:
    from jetfed.models import build_model
    return sum(t.numel() for t in build_model(name).state_dict().values() if t.is_floating_point())


def timed(fn, *args):
    start = time.process_time()
    result = fn(*args)
    return result, time.process_time() - start


def fleet(n: int, length: int, cls=SecAggClient) -> Tuple[SecAggServer, Dict[str, SecAggClient], Dict[str, float]]:
    fp = FixedPoint.for_fleet(1.0, max(n, 100))
    threshold = n // 2 + 1
    server = SecAggServer(run_id=RUN, threshold=threshold, fixed_point=fp, length=length)
    clients, worker_s, server_s = {}, 0.0, 0.0
    for i in range(n):
        (client, seconds) = timed(lambda w: cls(w, run_id=RUN, fixed_point=fp), f"w{i:03d}")
        clients[client.worker] = client
        advert, s = timed(client.advertise)
        worker_s += seconds + s if i == 0 else 0
        server_s += timed(server.receive_advertisement, advert)[1]
    roster, s = timed(server.roster)
    server_s += s
    bytes_setup = 0
    for i, client in enumerate(clients.values()):
        s1 = timed(client.receive_roster, roster)[1]
        shares, s2 = timed(client.share_keys)
        if i == 0:
            worker_s += s1 + s2
            bytes_setup = sum(len(s.ciphertext) for s in shares.shares)
        server_s += timed(server.receive_key_shares, shares)[1]
    return server, clients, {"worker_setup_s": worker_s, "server_setup_s": server_s,
                             "worker_setup_upload_bytes": bytes_setup}


def server_round(server: SecAggServer, clients: Dict[str, SecAggClient], round_number: int, update: np.ndarray,
                 dropped: Iterable[str]) -> Dict[str, float]:
    dropped = set(dropped)
    start = server.start_round(round_number, list(clients))
    collect = 0.0
    upload_extra = 0
    for worker in start.participants:
        masked = clients[worker].mask(start, update)
        if worker in dropped:
            continue
        collect += timed(server.receive_masked_input, masked)[1]
        upload_extra = sum(len(s.ciphertext) for s in masked.self_shares) + len(masked.commitment)
    requests, close_s = timed(server.close_masked_inputs, round_number)
    responses_s, unmask_worker_s, request_bytes, response_bytes = 0.0, 0.0, 0, 0
    for i, (worker, request) in enumerate(requests.items()):
        response, s = timed(clients[worker].unmask, request)
        if i == 0:
            unmask_worker_s = s
            request_bytes = sum(len(x.ciphertext) for x in request.shares)
            response_bytes = sum(len(x.y) + 8 for x in response.shares)
        responses_s += timed(server.receive_unmask_response, response)[1]
    aggregate, finish_s = timed(server.finish, round_number)
    expected = (server.fixed_point.encode(update).astype(np.uint64) * len(aggregate.survivors)) % (1 << 32)
    assert np.array_equal(aggregate.total, expected.astype(np.uint32)), "the unmasked sum is not the plaintext sum"
    return {"server_collect_s": collect, "server_close_s": close_s, "server_responses_s": responses_s,
            "server_finish_s": finish_s, "worker_unmask_s": unmask_worker_s,
            "worker_upload_extra_bytes": upload_extra, "unmask_request_bytes": request_bytes,
            "unmask_response_bytes": response_bytes}


def measure(model: str, length: int, n: int) -> Dict[str, object]:
    update = np.random.default_rng(0).uniform(-0.5, 0.5, length).astype(np.float32)
    row: Dict[str, object] = {"model": model, "parameters": length, "workers": n, "threshold": n // 2 + 1}
    server, clients, setup = fleet(n, length)
    row.update(setup)
    start = server.start_round(1, list(clients))
    _, row["worker_mask_s"] = timed(clients["w000"].mask, start, update)
    server.abandon(1)
    server, clients, _ = fleet(n, length, OnlyWithDropper)
    for label, round_number, dropper in (("all", 1, ""), ("one_dropped", 2, f"w{n - 1:03d}")):
        OnlyWithDropper.dropper = dropper
        figures = server_round(server, clients, round_number, update, [dropper] if dropper else [])
        for key, value in figures.items():
            if label == "all" and key.startswith("worker_unmask"):
                continue
            row[f"{key}[{label}]"] = value
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}


def main(argv: List[str] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="mnist-cnn,resnet18")
    parser.add_argument("--workers", default="3,10,100")
    args = parser.parse_args(argv)
    print(json.dumps({"machine": platform.processor() or platform.machine(), "python": platform.python_version(),
                      "clock": "process CPU time (time.process_time), one process"}))
    keys.generate_keypair()  # import and initialise cryptography before anything is timed
    for model in args.models.split(","):
        length = model_length(model)
        for n in (int(x) for x in args.workers.split(",")):
            print(json.dumps(measure(model, length, n)), flush=True)


if __name__ == "__main__":
    main()
