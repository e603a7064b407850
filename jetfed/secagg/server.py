"""The coordinator's side of secure aggregation: one `SecAggServer` per run.

It stores sealed shares it cannot open, hands each worker the ciphertexts it must open,
and ends each round with the sum of the survivors' fixed-point inputs. Every message is
checked before it changes any state, so a hostile or confused worker's message is
refused (`ProtocolViolation`) and the round carries on without it."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Set, Tuple

import numpy as np

from jetfed.secagg import keys, masking, shares
from jetfed.secagg.common import check_worker_id, commitment
from jetfed.secagg.errors import BelowThreshold, ProtocolViolation, SecAggConfigError
from jetfed.secagg.fixed_point import FixedPoint
from jetfed.secagg.messages import (MASK_KEY, SELF_MASK, EncryptedShare, KeyAdvertisement, KeyShares, MaskedInput,
                                    Member, RevealedShare, Roster, RoundStart, UnmaskRequest, UnmaskResponse)

log = logging.getLogger(__name__)
MAX_RECONSTRUCTION_TRIES = 64


@dataclass(frozen=True)
class Aggregate:
    """A round's result: the uint32 sum, its decoded float64 sum, and who is in it."""

    round_number: int
    total: np.ndarray
    values: np.ndarray
    survivors: Tuple[str, ...]
    dropped: Tuple[str, ...]


@dataclass
class _Round:
    start: RoundStart
    epochs: Dict[str, int]
    total: np.ndarray
    commitments: Dict[str, bytes]
    self_shares: Dict[str, Tuple[EncryptedShare, ...]]
    closed: bool = False
    survivors: Tuple[str, ...] = ()
    dropped: Tuple[str, ...] = ()
    revealed: Optional[Dict[str, List[RevealedShare]]] = None


class SecAggServer:
    """Setup, rounds and unmasking, as a state machine driven by the round loop."""

    def __init__(self, *, run_id: str, threshold: int, fixed_point: FixedPoint, length: int) -> None:
        if threshold < 2:
            raise SecAggConfigError(f"secagg threshold: {threshold} must be at least 2")
        if length < 1:
            raise SecAggConfigError(f"secagg: vector length {length} must be positive")
        self.run_id, self.threshold, self.fixed_point, self.length = run_id, threshold, fixed_point, length
        self._members: Dict[str, Member] = {}
        self._next_index = 1
        self._indices: Dict[str, int] = {}
        self._key_shares: Dict[str, Dict[str, EncryptedShare]] = {}
        self._sealed_to: Dict[str, Dict[str, bytes]] = {}
        self._burned: Set[str] = set()
        self._last_round = 0
        self._round: Optional[_Round] = None
        self._roster_issued = False

    # setup ------------------------------------------------------------------------------
    def receive_advertisement(self, advert: KeyAdvertisement) -> None:
        """S1: a new worker, or a new epoch of one (its old key and shares are dropped)."""
        check_worker_id(advert.worker)
        keys.check_public(advert.channel_public, "channel key")
        keys.check_public(advert.mask_public, "mask key")
        old = self._members.get(advert.worker)
        if old is not None and advert.epoch <= old.epoch:
            raise ProtocolViolation(f"secagg: {advert.worker!r} advertised epoch {advert.epoch}, not after "
                                    f"its epoch {old.epoch}")
        if old is None and self._roster_issued and self.threshold <= (len(self._members) + 1) // 2:
            raise SecAggConfigError(f"secagg: {advert.worker!r} cannot join: threshold {self.threshold} would no "
                                    f"longer exceed half of {len(self._members) + 1} members; start the run with "
                                    "a higher secagg threshold to admit more workers")
        if advert.worker not in self._indices:
            self._indices[advert.worker] = self._next_index
            self._next_index += 1
        self._members[advert.worker] = Member(worker=advert.worker, index=self._indices[advert.worker],
                                              epoch=advert.epoch, channel_public=advert.channel_public,
                                              mask_public=advert.mask_public)
        self._key_shares.pop(advert.worker, None)
        self._sealed_to.pop(advert.worker, None)
        self._burned.discard(advert.worker)

    def roster(self) -> Roster:
        """What every member must hold before it shares keys or masks."""
        if not len(self._members) // 2 + 1 <= self.threshold <= len(self._members) - 1:
            raise SecAggConfigError(f"secagg threshold: {self.threshold} must exceed half of the "
                                    f"{len(self._members)} members and be at most {len(self._members) - 1}")
        self._roster_issued = True
        return Roster(run_id=self.run_id, threshold=self.threshold,
                      members=tuple(sorted(self._members.values(), key=lambda m: m.index)))

    def receive_key_shares(self, message: KeyShares) -> None:
        """S2: a member's sealed mask-key shares, one for each other member, once per epoch."""
        member = self._member(message.worker)
        if message.epoch != member.epoch:
            raise ProtocolViolation(f"secagg: {message.worker!r} sent shares for epoch {message.epoch}, "
                                    f"its keys are epoch {member.epoch}")
        if message.worker in self._key_shares:
            raise ProtocolViolation(f"secagg: {message.worker!r} already shared its mask key for this epoch")
        held: Dict[str, EncryptedShare] = {}
        for share in message.shares:
            holder = self._members.get(share.holder)
            if (holder is None or share.holder == message.worker or share.holder in held
                    or (share.owner, share.kind, share.owner_epoch, share.round_number)
                    != (message.worker, MASK_KEY, member.epoch, 0)):
                raise ProtocolViolation(f"secagg: {message.worker!r} sent a malformed mask-key share "
                                        f"(for {share.holder!r})")
            held[share.holder] = share
        if len(held) < self.threshold:
            raise ProtocolViolation(f"secagg: {message.worker!r} shared its key with {len(held)} members, "
                                    f"fewer than the threshold {self.threshold}")
        self._key_shares[message.worker] = held
        self._sealed_to[message.worker] = {h: self._members[h].channel_public for h in held}

    # rounds -----------------------------------------------------------------------------
    def start_round(self, round_number: int, selected: Sequence[str]) -> RoundStart:
        """The participants of a round: the selected members that finished setup and
        whose keys are not burned."""
        if self._round is not None and not self._round.closed:
            raise SecAggConfigError(f"secagg: round {self._round.start.round_number} is still collecting")
        if round_number <= self._last_round:
            raise SecAggConfigError(f"secagg: round number {round_number} is not after {self._last_round}; "
                                    "a retried round takes a new number")
        participants = tuple(w for w in dict.fromkeys(selected) if w in self._key_shares and w not in self._burned)
        if len(participants) < self.threshold:
            raise BelowThreshold(f"secagg: round {round_number} has {len(participants)} keyed workers, fewer "
                                 f"than the threshold {self.threshold}")
        self.fixed_point.check_capacity(len(participants))
        start = RoundStart(round_number=round_number, participants=participants, length=self.length)
        self._round = _Round(start=start, epochs={w: self._members[w].epoch for w in participants},
                             total=np.zeros(self.length, dtype=np.uint32), commitments={}, self_shares={})
        self._last_round = round_number
        return start

    def receive_masked_input(self, message: MaskedInput) -> None:
        """A participant's masked vector, checked whole before it is added to the
        round's running sum (the coordinator keeps one vector per round, not one per
        worker)."""
        current = self._current(message.round_number, "masked input")
        if current.closed:
            raise ProtocolViolation(f"secagg: masked input of {message.worker!r} arrived after round "
                                    f"{message.round_number} stopped collecting; it counts as dropped")
        if message.worker not in current.epochs:
            raise ProtocolViolation(f"secagg: {message.worker!r} is not a participant of round {message.round_number}")
        if message.worker in current.commitments:
            raise ProtocolViolation(f"secagg: {message.worker!r} sent a second masked input for round "
                                    f"{message.round_number}")
        vector = message.vector
        if not isinstance(vector, np.ndarray) or vector.dtype != np.uint32 or vector.shape != (self.length,):
            raise ProtocolViolation(f"secagg: masked input of {message.worker!r} must be {self.length} uint32 "
                                    f"values, got {getattr(vector, 'dtype', type(vector))} "
                                    f"{getattr(vector, 'shape', '')}")
        if not isinstance(message.commitment, bytes) or len(message.commitment) != 32:
            raise ProtocolViolation(f"secagg: masked input of {message.worker!r} lacks a 32-byte commitment")
        holders: Set[str] = set()
        for share in message.self_shares:
            if (share.holder not in current.epochs or share.holder == message.worker or share.holder in holders
                    or (share.owner, share.kind, share.owner_epoch, share.round_number)
                    != (message.worker, SELF_MASK, current.epochs[message.worker], message.round_number)):
                raise ProtocolViolation(f"secagg: masked input of {message.worker!r} carries a malformed "
                                        f"self-mask share (for {share.holder!r})")
            holders.add(share.holder)
        if holders != set(current.epochs) - {message.worker}:
            raise ProtocolViolation(f"secagg: masked input of {message.worker!r} must carry one self-mask share "
                                    "per other participant")
        np.add(current.total, vector, out=current.total)
        current.commitments[message.worker] = message.commitment
        current.self_shares[message.worker] = tuple(message.self_shares)

    def close_masked_inputs(self, round_number: int) -> Dict[str, UnmaskRequest]:
        """End the masked-input stage (deadline or all in): one unmask request per
        survivor. Fewer than `threshold` survivors fail the round with nothing revealed;
        the dropped workers' mask keys are burned from here on."""
        current = self._current(round_number, "close")
        if current.closed:
            raise SecAggConfigError(f"secagg: round {round_number} already stopped collecting")
        survivors = tuple(w for w in current.start.participants if w in current.commitments)
        dropped = tuple(w for w in current.start.participants if w not in current.commitments)
        current.closed = True
        if len(survivors) < self.threshold:
            self._end(current)
            raise BelowThreshold(f"secagg: round {round_number}: {len(survivors)} masked inputs, fewer than the "
                                 f"threshold {self.threshold}; the round fails and nothing is revealed")
        for lost in dropped:
            holders = [w for w in survivors if self._holds(lost, w)]
            if len(holders) < self.threshold:
                self._end(current)
                raise BelowThreshold(f"secagg: round {round_number}: {lost!r} dropped and only {len(holders)} "
                                     f"survivors hold shares of its key (threshold {self.threshold})")
        current.survivors, current.dropped, current.revealed = survivors, dropped, {}
        self._burned.update(dropped)
        requests = {}
        for holder in survivors:
            addressed = [s for w in survivors if w != holder for s in current.self_shares[w]
                         if s.holder == holder]
            addressed += [self._key_shares[lost][holder] for lost in dropped if self._holds(lost, holder)]
            requests[holder] = UnmaskRequest(round_number=round_number, survivors=survivors, dropped=dropped,
                                             shares=tuple(addressed))
        if dropped:
            log.info("secagg round=%d dropped=%s (their mask keys are burned until they re-key)",
                     round_number, ",".join(dropped))
        return requests

    def receive_unmask_response(self, message: UnmaskResponse) -> None:
        """A survivor's opened shares, checked whole before any is kept."""
        current = self._current(message.round_number, "unmask response")
        if not current.closed or current.revealed is None:
            raise ProtocolViolation(f"secagg: unmask response of {message.worker!r} before round "
                                    f"{message.round_number} asked for one")
        if message.worker not in current.survivors:
            raise ProtocolViolation(f"secagg: {message.worker!r} is not a survivor of round {message.round_number}; "
                                    "its unmask response is refused")
        if message.worker in current.revealed:
            raise ProtocolViolation(f"secagg: {message.worker!r} answered round {message.round_number}'s unmask twice")
        index = self._members[message.worker].index
        seen: Set[Tuple[str, str]] = set()
        for share in message.shares:
            expected = SELF_MASK if share.owner in current.survivors else MASK_KEY
            if (share.owner not in current.epochs or share.kind != expected or share.x != index
                    or (share.owner, share.kind) in seen
                    or (share.kind == MASK_KEY and not self._holds(share.owner, message.worker))):
                raise ProtocolViolation(f"secagg: {message.worker!r} revealed an unexpected {share.kind} share of "
                                        f"{share.owner!r}")
            shares.decode_share(share.y)
            seen.add((share.owner, share.kind))
        current.revealed[message.worker] = list(message.shares)

    def finish(self, round_number: int) -> Aggregate:
        """Reconstruct the secrets, strip every mask, and return the survivors' sum.
        Fewer than `threshold` responses fail the round (BelowThreshold)."""
        current = self._current(round_number, "finish")
        if current.revealed is None:
            raise SecAggConfigError(f"secagg: round {round_number} has not asked for unmasking")
        self._end(current)
        if len(current.revealed) < self.threshold:
            raise BelowThreshold(f"secagg: round {round_number}: {len(current.revealed)} unmask responses, fewer "
                                 f"than the threshold {self.threshold}")
        by_owner: Dict[Tuple[str, str], List[shares.Share]] = {}
        for opened in current.revealed.values():
            for share in opened:
                by_owner.setdefault((share.owner, share.kind), []).append((share.x, shares.decode_share(share.y)))
        total = current.total
        for worker in current.survivors:
            expected = current.commitments[worker]
            seed = self._reconstruct(by_owner.get((worker, SELF_MASK), []), worker, "self-mask seed",
                                     lambda s, w=worker, e=expected: commitment(s, run_id=self.run_id,
                                                                                round_number=round_number, owner=w) == e)
            masking.apply_mask(total, masking.prg(masking.self_mask_key(
                seed, run_id=self.run_id, round_number=round_number, owner=worker), self.length), -1)
        for lost in current.dropped:
            public = self._members[lost].mask_public
            private = self._reconstruct(by_owner.get((lost, MASK_KEY), []), lost, "mask key",
                                        lambda s, p=public: keys.public_of(s) == p)
            for worker in current.survivors:
                pair = masking.pair_mask_key(keys.agree(private, self._members[worker].mask_public),
                                             run_id=self.run_id, round_number=round_number,
                                             first=min(worker, lost), second=max(worker, lost))
                masking.apply_mask(total, masking.prg(pair, self.length), -masking.pair_sign(worker, lost))
        values = self.fixed_point.decode_sum(total, len(current.survivors))
        return Aggregate(round_number=round_number, total=total, values=values, survivors=current.survivors,
                         dropped=current.dropped)

    def abandon(self, round_number: int) -> None:
        """Give up a round the driver failed for its own reasons (deadline, too few
        trainers); its participants that did not finish unmasking must re-key."""
        self._end(self._current(round_number, "abandon"))

    def must_rekey(self) -> Tuple[str, ...]:
        """Workers the driver must ask to re-key (S1 and S2 again) before they mask:
        those that did not finish a round's unmasking (their key may have been revealed,
        and they refuse to mask with it), and those whose mask key fewer than `threshold`
        usable members can open (holders left, re-keyed or must re-key themselves), whose
        masks could not be removed if they dropped."""
        keyed = set(self._key_shares)
        thin = {w for w in self.members()
                if sum(1 for h in keyed if h != w and self._holds(w, h)) < self.threshold}
        return tuple(sorted((self._burned & set(self._key_shares)) | thin))

    def _end(self, current: _Round) -> None:
        """Close a round: a worker that sent a masked input and did not answer an unmask
        request for it (none came, or it was silent), and every dropped worker whose key
        shares were asked for, must re-key. (A worker whose masked input was lost on the
        way refuses the next round itself, saying it must re-key.)"""
        self._burned.update((set(current.commitments) - set(current.revealed or {})) | set(current.dropped))
        self._round = None

    def members(self) -> Tuple[str, ...]:
        """Workers that finished setup for their current epoch and are not burned."""
        return tuple(w for w in self._key_shares if w not in self._burned)

    def _reconstruct(self, points: List[shares.Share], owner: str, what: str, check) -> bytes:
        if len(points) < self.threshold:
            raise BelowThreshold(f"secagg: {len(points)} shares of {owner!r}'s {what}, fewer than the threshold "
                                 f"{self.threshold}")
        for chosen in shares.subsets(sorted(points), self.threshold, MAX_RECONSTRUCTION_TRIES):
            try:
                secret = shares.combine(chosen)
            except ProtocolViolation:
                continue
            if check(secret):
                return secret
        raise ProtocolViolation(f"secagg: the shares of {owner!r}'s {what} do not reconstruct it (a holder sent a "
                                "wrong share); the round fails")

    def _holds(self, owner: str, holder: str) -> bool:
        """Whether `holder` can open its share of `owner`'s mask key: it has one, sealed
        to the channel key it still has (a restarted worker, with a new channel key,
        cannot open the shares sealed to its old one)."""
        sealed_to = self._sealed_to.get(owner, {}).get(holder)
        return sealed_to is not None and sealed_to == self._members[holder].channel_public

    def _member(self, worker: str) -> Member:
        member = self._members.get(worker)
        if member is None:
            raise ProtocolViolation(f"secagg: {worker!r} has not advertised keys")
        return member

    def _current(self, round_number: int, what: str) -> _Round:
        if self._round is None or self._round.start.round_number != round_number:
            raise ProtocolViolation(f"secagg: {what} for round {round_number}, which is not the open round")
        return self._round
