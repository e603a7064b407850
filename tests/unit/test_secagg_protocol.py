"""The secure-aggregation protocol end to end, in process: the unmasked sum is the
plaintext fixed-point sum bit for bit, dropouts at each stage, the threshold, burned
and re-keyed workers, joiners, hostile messages refused without harm, and a masked
vector that looks like noise."""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Sequence, Tuple

import numpy as np
import pytest

from jetfed.secagg import keys, masking, shares
from jetfed.secagg import (AggregateOutOfRange, BelowThreshold, FixedPoint, ProtocolViolation, SecAggClient,
                           SecAggConfigError, SecAggServer)
from jetfed.secagg.messages import MASK_KEY, SELF_MASK, RevealedShare, RoundStart, UnmaskResponse

RUN = "run-1"
LENGTH = 2000


def fleet(n: int, threshold: int, *, length: int = LENGTH) -> Tuple[SecAggServer, Dict[str, SecAggClient]]:
    """Setup (S1 and S2) for workers w00..w{n-1}."""
    fp = FixedPoint.for_fleet(1.0, max(n, 10))
    server = SecAggServer(run_id=RUN, threshold=threshold, fixed_point=fp, length=length)
    clients = {f"w{i:02d}": SecAggClient(f"w{i:02d}", run_id=RUN, fixed_point=fp) for i in range(n)}
    for client in clients.values():
        server.receive_advertisement(client.advertise())
    roster = server.roster()
    for client in clients.values():
        client.receive_roster(roster)
    for client in clients.values():
        server.receive_key_shares(client.share_keys())
    return server, clients


def updates(ids: Sequence[str], seed: int, length: int = LENGTH) -> Dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {w: rng.uniform(-1.2, 1.2, length).astype(np.float32) for w in ids}


def plaintext_sum(fp: FixedPoint, inputs: Sequence[np.ndarray]) -> np.ndarray:
    total = np.zeros(inputs[0].size, dtype=np.uint64)
    for x in inputs:
        total += fp.encode(x)
    return (total % (1 << 32)).astype(np.uint32)


def run_round(server: SecAggServer, clients: Dict[str, SecAggClient], round_number: int,
              inputs: Dict[str, np.ndarray], *, drop_masking: Sequence[str] = (),
              drop_unmask: Sequence[str] = ()):
    start = server.start_round(round_number, list(clients))
    for worker in start.participants:
        masked = clients[worker].mask(start, inputs[worker])
        if worker not in drop_masking:
            server.receive_masked_input(masked)
    requests = server.close_masked_inputs(round_number)
    for worker, request in requests.items():
        if worker not in drop_unmask:
            server.receive_unmask_response(clients[worker].unmask(request))
    return server.finish(round_number)


@pytest.mark.parametrize("n,threshold", [(3, 2), (4, 3), (7, 4), (10, 6)])
def test_the_unmasked_sum_is_the_plaintext_fixed_point_sum_bit_for_bit(n, threshold):
    server, clients = fleet(n, threshold)
    for round_number in (1, 2):
        inputs = updates(list(clients), seed=10 * n + round_number)
        result = run_round(server, clients, round_number, inputs)
        assert np.array_equal(result.total, plaintext_sum(server.fixed_point, list(inputs.values())))
        clipped = np.clip(np.stack(list(inputs.values())).astype(np.float64), -1, 1).sum(axis=0)
        assert np.max(np.abs(result.values - clipped)) <= n * 0.5 / server.fixed_point.scale


def test_one_of_three_dropping_after_masking_leaves_the_sum_of_the_other_two():
    server, clients = fleet(3, 2)
    inputs = updates(list(clients), seed=3)
    result = run_round(server, clients, 1, inputs, drop_masking=["w01"])
    assert result.survivors == ("w00", "w02") and result.dropped == ("w01",)
    assert np.array_equal(result.total, plaintext_sum(server.fixed_point, [inputs["w00"], inputs["w02"]]))


def test_dropouts_at_masking_and_at_unmasking_in_one_round():
    server, clients = fleet(7, 4)
    inputs = updates(list(clients), seed=4)
    result = run_round(server, clients, 1, inputs, drop_masking=["w02", "w05"], drop_unmask=["w00"])
    kept = [w for w in clients if w not in ("w02", "w05")]
    assert result.survivors == tuple(kept)
    assert np.array_equal(result.total, plaintext_sum(server.fixed_point, [inputs[w] for w in kept]))


def test_too_few_masked_inputs_fail_the_round_before_anything_is_revealed():
    server, clients = fleet(3, 2)
    start = server.start_round(1, list(clients))
    server.receive_masked_input(clients["w00"].mask(start, updates(["w00"], 5)["w00"]))
    with pytest.raises(BelowThreshold, match="1 masked inputs, fewer than the threshold 2"):
        server.close_masked_inputs(1)
    # w00 masked and was never asked to unmask: it cannot tell whether its key was
    # revealed, so both sides want a new epoch from it; the others never masked
    assert server.must_rekey() == ("w00",) and server.members() == ("w01", "w02")
    with pytest.raises(ProtocolViolation, match="must re-key first"):
        clients["w00"].mask(RoundStart(round_number=2, participants=tuple(clients), length=LENGTH),
                            np.zeros(LENGTH, dtype=np.float32))
    rekey(server, clients, "w00")
    inputs = updates(list(clients), seed=6)
    assert np.array_equal(run_round(server, clients, 2, inputs).total,
                          plaintext_sum(server.fixed_point, list(inputs.values())))


def test_too_few_unmask_responses_fail_the_round():
    server, clients = fleet(5, 3)
    inputs = updates(list(clients), seed=7)
    with pytest.raises(BelowThreshold, match="2 unmask responses, fewer than the threshold 3"):
        run_round(server, clients, 1, inputs, drop_unmask=["w00", "w01", "w02"])


def test_a_dropped_worker_is_burned_its_late_input_refused_until_it_rekeys():
    server, clients = fleet(4, 3)
    inputs = updates(list(clients), seed=8)
    start = server.start_round(1, list(clients))
    masked = {w: clients[w].mask(start, inputs[w]) for w in start.participants}
    for w in ("w00", "w01", "w02"):
        server.receive_masked_input(masked[w])
    requests = server.close_masked_inputs(1)
    with pytest.raises(ProtocolViolation, match="after round 1 stopped collecting"):
        server.receive_masked_input(masked["w03"])
    for w, request in requests.items():
        server.receive_unmask_response(clients[w].unmask(request))
    server.finish(1)
    assert server.start_round(2, list(clients)).participants == ("w00", "w01", "w02")
    with pytest.raises(ProtocolViolation, match="must re-key"):
        clients["w00"].mask(dataclasses.replace(start, round_number=3), inputs["w00"])
    server.abandon(2)
    assert server.must_rekey() == ("w03",)
    rekey(server, clients, "w03")
    assert server.must_rekey() == ()
    inputs = updates(list(clients), seed=9)
    result = run_round(server, clients, 4, inputs)
    assert result.survivors == tuple(clients)
    assert np.array_equal(result.total, plaintext_sum(server.fixed_point, list(inputs.values())))


def rekey(server: SecAggServer, clients: Dict[str, SecAggClient], worker: str) -> None:
    """S1 and S2 again for one worker; the others take the new roster."""
    server.receive_advertisement(clients[worker].rekey())
    roster = server.roster()
    for client in clients.values():
        client.receive_roster(roster)
    server.receive_key_shares(clients[worker].share_keys())


def test_a_worker_joining_later_takes_part_without_the_others_resharing():
    server, clients = fleet(4, 3)
    run_round(server, clients, 1, updates(list(clients), seed=11))
    joiner = SecAggClient("w04", run_id=RUN, fixed_point=server.fixed_point)
    server.receive_advertisement(joiner.advertise())
    clients["w04"] = joiner
    roster = server.roster()
    for client in clients.values():
        client.receive_roster(roster)
    server.receive_key_shares(joiner.share_keys())
    inputs = updates(list(clients), seed=12)
    result = run_round(server, clients, 2, inputs, drop_masking=["w00"])
    assert result.survivors == ("w01", "w02", "w03", "w04")
    assert np.array_equal(result.total, plaintext_sum(server.fixed_point, [inputs[w] for w in result.survivors]))
    with pytest.raises(SecAggConfigError, match="'w05' cannot join: threshold 3 would no longer exceed half"):
        server.receive_advertisement(SecAggClient("w05", run_id=RUN, fixed_point=server.fixed_point).advertise())


# hostile and confused messages ------------------------------------------------------------

def open_round(n: int = 3, threshold: int = 2, seed: int = 13):
    server, clients = fleet(n, threshold)
    inputs = updates(list(clients), seed=seed)
    start = server.start_round(1, list(clients))
    masked = {w: clients[w].mask(start, inputs[w]) for w in start.participants}
    return server, clients, inputs, masked


def test_malformed_masked_inputs_are_refused_and_the_round_goes_on():
    server, clients, inputs, masked = open_round()
    good = masked["w00"]
    bad = [
        (dataclasses.replace(good, vector=good.vector[:-1]), "must be 2000 uint32"),
        (dataclasses.replace(good, vector=good.vector.astype(np.int64)), "must be 2000 uint32"),
        (dataclasses.replace(good, vector=good.vector.astype(np.float32)), "must be 2000 uint32"),
        (dataclasses.replace(good, vector=list(good.vector)), "must be 2000 uint32"),
        (dataclasses.replace(good, worker="stranger"), "not a participant"),
        (dataclasses.replace(good, round_number=2), "not the open round"),
        (dataclasses.replace(good, commitment=b"x"), "commitment"),
        (dataclasses.replace(good, self_shares=good.self_shares[:1]), "one self-mask share per other"),
        (dataclasses.replace(good, self_shares=good.self_shares[:1] * 2), "malformed self-mask share"),
        (dataclasses.replace(good, self_shares=tuple(dataclasses.replace(s, kind=MASK_KEY)
                                                     for s in good.self_shares)), "malformed self-mask share"),
    ]
    for message, why in bad:
        with pytest.raises(ProtocolViolation, match=why):
            server.receive_masked_input(message)
    for worker in clients:
        server.receive_masked_input(masked[worker])
    with pytest.raises(ProtocolViolation, match="second masked input"):
        server.receive_masked_input(good)
    requests = server.close_masked_inputs(1)
    for worker, request in requests.items():
        server.receive_unmask_response(clients[worker].unmask(request))
    assert np.array_equal(server.finish(1).total, plaintext_sum(server.fixed_point, list(inputs.values())))


def test_a_garbage_masked_vector_makes_the_round_fail_not_the_coordinator():
    server, clients, inputs, masked = open_round()
    garbage = np.random.default_rng(0).integers(0, 1 << 32, LENGTH, dtype=np.uint64).astype(np.uint32)
    server.receive_masked_input(dataclasses.replace(masked["w00"], vector=garbage))
    for worker in ("w01", "w02"):
        server.receive_masked_input(masked[worker])
    requests = server.close_masked_inputs(1)
    for worker, request in requests.items():
        server.receive_unmask_response(clients[worker].unmask(request))
    with pytest.raises(AggregateOutOfRange):
        server.finish(1)


def test_unmask_responses_from_outside_the_stage_or_twice_are_refused():
    server, clients, inputs, masked = open_round(n=4, threshold=3)
    for worker in ("w00", "w01", "w02"):
        server.receive_masked_input(masked[worker])
    with pytest.raises(ProtocolViolation, match="before round 1 asked"):
        server.receive_unmask_response(UnmaskResponse(worker="w00", round_number=1, shares=()))
    requests = server.close_masked_inputs(1)
    assert "w03" not in requests
    responses = {w: clients[w].unmask(r) for w, r in requests.items()}
    with pytest.raises(ProtocolViolation, match="not a survivor"):
        server.receive_unmask_response(dataclasses.replace(responses["w00"], worker="w03"))
    first = responses["w00"].shares[0]
    for changed, why in ((dataclasses.replace(first, x=99), "unexpected"),
                         (dataclasses.replace(first, kind=MASK_KEY), "unexpected"),
                         (dataclasses.replace(first, y=b"\x00" * 3), "66 bytes")):
        with pytest.raises(ProtocolViolation, match=why):
            server.receive_unmask_response(dataclasses.replace(responses["w00"], shares=(changed,)))
    for response in responses.values():
        server.receive_unmask_response(response)
    with pytest.raises(ProtocolViolation, match="twice"):
        server.receive_unmask_response(responses["w00"])
    kept = [inputs[w] for w in ("w00", "w01", "w02")]
    assert np.array_equal(server.finish(1).total, plaintext_sum(server.fixed_point, kept))


def lie(response, owner_kind: Tuple[str, str]):
    """The same response with one share's value changed."""
    shares: List[RevealedShare] = []
    for share in response.shares:
        if (share.owner, share.kind) == owner_kind:
            share = dataclasses.replace(share, y=(int.from_bytes(share.y, "big") + 1).to_bytes(66, "big"))
        shares.append(share)
    return dataclasses.replace(response, shares=tuple(shares))


def test_a_wrong_share_is_outvoted_when_spares_exist_and_fails_the_round_otherwise():
    for n, threshold, expect_sum in ((5, 3, True), (3, 2, False)):
        server, clients, inputs, masked = open_round(n=n, threshold=threshold, seed=14)
        for worker in clients:
            server.receive_masked_input(masked[worker])
        requests = server.close_masked_inputs(1)
        if not expect_sum:
            del requests["w02"]  # w02 never answers: exactly `threshold` shares of w00's seed remain
        for worker, request in requests.items():
            response = clients[worker].unmask(request)
            server.receive_unmask_response(lie(response, ("w00", SELF_MASK)) if worker == "w01" else response)
        if expect_sum:
            assert np.array_equal(server.finish(1).total, plaintext_sum(server.fixed_point, list(inputs.values())))
        else:
            with pytest.raises(ProtocolViolation, match="'w00'.s self-mask seed do not reconstruct"):
                server.finish(1)


def test_a_worker_refuses_unmask_requests_that_would_reveal_more_than_the_sum():
    server, clients, inputs, masked = open_round(n=4, threshold=3)
    for worker in ("w00", "w01", "w02"):
        server.receive_masked_input(masked[worker])
    requests = server.close_masked_inputs(1)
    honest = requests["w01"]
    w00_mask_key = server._key_shares["w00"]["w01"]  # what a curious coordinator holds for w01
    tampered = dataclasses.replace(honest.shares[0], ciphertext=honest.shares[0].ciphertext[:-1] + b"\x00")
    hostile = [
        (dataclasses.replace(honest, shares=honest.shares + (w00_mask_key,)), "does not allow"),
        (dataclasses.replace(honest, survivors=("w00", "w02", "w03"), dropped=("w01",)), "names this worker dropped"),
        (dataclasses.replace(honest, survivors=("w00", "w01"), dropped=("w02", "w03")), "fewer than the threshold"),
        (dataclasses.replace(honest, dropped=()), "split the round's participants"),
        (dataclasses.replace(honest, round_number=7), "no open masked input"),
        (dataclasses.replace(honest, shares=(tampered,) + honest.shares[1:]), "authenticate"),
        (dataclasses.replace(honest, shares=(dataclasses.replace(honest.shares[0], kind=MASK_KEY),)), "does not allow"),
    ]
    for request, why in hostile:
        with pytest.raises(ProtocolViolation, match=why):
            clients["w01"].unmask(request)
    response = clients["w01"].unmask(honest)
    with pytest.raises(ProtocolViolation, match="no open masked input"):
        clients["w01"].unmask(honest)
    server.receive_unmask_response(response)


def test_a_worker_never_reuses_a_round_number_nor_masks_with_strangers():
    server, clients, inputs, masked = open_round()
    start = RoundStart(round_number=1, participants=tuple(clients), length=LENGTH)
    with pytest.raises(ProtocolViolation, match="masks are never reused"):
        clients["w00"].mask(start, inputs["w00"])
    _, fresh = fleet(3, 2)
    with pytest.raises(ProtocolViolation, match="not in the roster"):
        fresh["w01"].mask(dataclasses.replace(start, participants=("w01", "w02", "mallory")), inputs["w01"])
    with pytest.raises(ProtocolViolation, match="leave this worker out"):
        fresh["w01"].mask(dataclasses.replace(start, participants=("w00", "w02")), inputs["w01"])
    with pytest.raises(ProtocolViolation, match="expects 2000 values"):
        fresh["w01"].mask(start, inputs["w01"][:10])


def test_a_roster_that_swaps_a_members_keys_or_leaves_this_worker_out_is_refused():
    server, clients = fleet(3, 2)
    roster = server.roster()
    swapped = dataclasses.replace(roster.members[1], mask_public=roster.members[2].mask_public)
    with pytest.raises(ProtocolViolation, match="without a new epoch"):
        clients["w00"].receive_roster(dataclasses.replace(roster, members=(roster.members[0], swapped,
                                                                           roster.members[2])))
    with pytest.raises(ProtocolViolation, match="own keys"):
        clients["w00"].receive_roster(dataclasses.replace(roster, members=roster.members[1:]))
    with pytest.raises(ProtocolViolation, match="exceed half"):
        clients["w00"].receive_roster(dataclasses.replace(roster, threshold=1))


# what reaches the coordinator from one worker ------------------------------------------------

def chi_square_of_bytes(vector: np.ndarray) -> float:
    counts = np.bincount(vector.astype("<u4").view(np.uint8), minlength=256)
    expected = counts.sum() / 256
    return float(((counts - expected) ** 2 / expected).sum())


def test_a_masked_vector_is_indistinguishable_from_noise():
    length = 50_000
    server, clients = fleet(3, 2, length=length)
    rng = np.random.default_rng(15)
    update = np.sin(np.arange(length) / 50.0).astype(np.float32) * 0.9 + rng.normal(0, 0.05, length).astype(np.float32)
    start = server.start_round(1, list(clients))
    masked = clients["w00"].mask(start, update).vector
    encoded = server.fixed_point.encode(update)
    plain_signed = server.fixed_point.to_signed(encoded).astype(np.float64)
    # 255 degrees of freedom: mean 255, sd 22.6; 400 is beyond 6 sd for uniform bytes
    assert chi_square_of_bytes(masked) < 400 < chi_square_of_bytes(encoded)
    for candidate in (masked.astype(np.float64), server.fixed_point.to_signed(masked).astype(np.float64)):
        assert abs(np.corrcoef(candidate, plain_signed)[0, 1]) < 0.03  # 1/sqrt(50k) = 0.0045
    assert np.corrcoef(plain_signed, update)[0, 1] > 0.99


def test_a_late_input_of_a_dropped_worker_stays_hidden_behind_its_self_mask():
    length = 50_000
    server, clients = fleet(4, 3, length=length)
    update = np.sin(np.arange(length) / 50.0).astype(np.float32) * 0.9
    start = server.start_round(1, list(clients))
    masked = {w: clients[w].mask(start, update) for w in start.participants}
    for worker in ("w00", "w01", "w02"):
        server.receive_masked_input(masked[worker])
    opened = [clients[w].unmask(r) for w, r in server.close_masked_inputs(1).items()]
    # a curious coordinator rebuilds w03's mask key and strips every pairwise mask from
    # w03's late vector: only the self-mask is left between it and w03's update
    points = [(s.x, int.from_bytes(s.y, "big")) for r in opened for s in r.shares if s.owner == "w03"]
    mask_key = shares.combine(points[:3])
    late = masked["w03"].vector.copy()
    for peer in ("w00", "w01", "w02"):
        secret = keys.agree(mask_key, server.roster().members[int(peer[1:])].mask_public)
        pair = masking.pair_mask_key(secret, run_id=RUN, round_number=1, first=peer, second="w03")
        masking.apply_mask(late, masking.prg(pair, length), -masking.pair_sign("w03", peer))
    encoded = server.fixed_point.encode(update)
    assert chi_square_of_bytes(late) < 400 < chi_square_of_bytes(encoded)
    plain = server.fixed_point.to_signed(encoded).astype(np.float64)
    assert abs(np.corrcoef(server.fixed_point.to_signed(late).astype(np.float64), plain)[0, 1]) < 0.03


def restart(server: SecAggServer, clients: Dict[str, SecAggClient], worker: str, epoch: int) -> None:
    """A worker process that restarted: new channel and mask keys, a later epoch."""
    clients[worker] = SecAggClient(worker, run_id=RUN, fixed_point=server.fixed_point, epoch=epoch)
    server.receive_advertisement(clients[worker].advertise())
    roster = server.roster()
    for client in clients.values():
        client.receive_roster(roster)
    server.receive_key_shares(clients[worker].share_keys())


def test_a_restarted_worker_is_not_asked_for_shares_sealed_to_its_old_channel_key():
    server, clients = fleet(5, 3)
    run_round(server, clients, 1, updates(list(clients), seed=16), drop_masking=["w04"])
    restart(server, clients, "w04", epoch=2)
    inputs = updates(list(clients), seed=17)
    result = run_round(server, clients, 2, inputs, drop_masking=["w00"])
    assert result.survivors == ("w01", "w02", "w03", "w04")
    assert np.array_equal(result.total, plaintext_sum(server.fixed_point, [inputs[w] for w in result.survivors]))


def test_a_mask_rekey_keeps_the_shares_a_worker_holds():
    server, clients = fleet(4, 3)
    run_round(server, clients, 1, updates(list(clients), seed=19), drop_masking=["w03"])
    rekey(server, clients, "w03")
    inputs = updates(list(clients), seed=20)
    # w03 (re-keyed) must open its share of w00's mask key: w01, w02, w03 make t = 3
    result = run_round(server, clients, 2, inputs, drop_masking=["w00"])
    assert result.survivors == ("w01", "w02", "w03")
    assert np.array_equal(result.total, plaintext_sum(server.fixed_point, [inputs[w] for w in result.survivors]))


def test_setup_messages_that_break_the_protocol_are_refused():
    server, clients = fleet(3, 2)
    stranger = SecAggClient("w09", run_id=RUN, fixed_point=server.fixed_point)
    advert = clients["w00"].advertise()
    with pytest.raises(ProtocolViolation, match="not after its epoch 1"):
        server.receive_advertisement(advert)
    with pytest.raises(ProtocolViolation, match="32 bytes"):
        server.receive_advertisement(dataclasses.replace(stranger.advertise(), mask_public=b"short"))
    with pytest.raises(ProtocolViolation, match="usable worker id"):
        server.receive_advertisement(dataclasses.replace(stranger.advertise(), worker="a|b"))
    fresh, clients = fleet_without_shares(3, 2)
    good = clients["w00"].share_keys()
    with pytest.raises(ProtocolViolation, match="has not advertised"):
        fresh.receive_key_shares(dataclasses.replace(good, worker="w09"))
    for bad, why in (
            (dataclasses.replace(good, epoch=2), "epoch 2"),
            (dataclasses.replace(good, shares=good.shares[:1]), "fewer than the threshold"),
            (dataclasses.replace(good, shares=good.shares[:1] * 2), "malformed"),
            (dataclasses.replace(good, shares=tuple(dataclasses.replace(s, kind=SELF_MASK) for s in good.shares)),
             "malformed"),
            (dataclasses.replace(good, shares=tuple(dataclasses.replace(s, owner="w01") for s in good.shares)),
             "malformed")):
        with pytest.raises(ProtocolViolation, match=why):
            fresh.receive_key_shares(bad)
    fresh.receive_key_shares(good)
    with pytest.raises(ProtocolViolation, match="already shared its mask key"):
        fresh.receive_key_shares(good)
    with pytest.raises(ProtocolViolation, match="already shared its mask key"):
        clients["w00"].share_keys()


def fleet_without_shares(n: int, threshold: int):
    fp = FixedPoint.for_fleet(1.0, 10)
    server = SecAggServer(run_id=RUN, threshold=threshold, fixed_point=fp, length=LENGTH)
    clients = {f"w{i:02d}": SecAggClient(f"w{i:02d}", run_id=RUN, fixed_point=fp) for i in range(n)}
    for client in clients.values():
        server.receive_advertisement(client.advertise())
    roster = server.roster()
    for client in clients.values():
        client.receive_roster(roster)
    return server, clients


def test_a_worker_whose_key_holders_fall_below_the_threshold_is_named_for_rekeying():
    server, clients = fleet(5, 3)
    assert server.must_rekey() == ()
    restart(server, clients, "w03", epoch=2)
    restart(server, clients, "w04", epoch=2)
    # the shares of w00..w02's mask keys that w03, w04 held were sealed to their old
    # channel keys: 2 usable holders each, below t = 3
    assert server.must_rekey() == ("w00", "w01", "w02")
    for worker in ("w00", "w01", "w02"):
        rekey(server, clients, worker)
    assert server.must_rekey() == ()
    inputs = updates(list(clients), seed=18)
    result = run_round(server, clients, 1, inputs, drop_masking=["w00", "w01"])
    assert np.array_equal(result.total, plaintext_sum(server.fixed_point, [inputs[w] for w in result.survivors]))
