"""The worker's side of secure aggregation: one `SecAggClient` per worker per run.

It holds the worker's private keys and refuses every request that would let the
coordinator learn more than the sum: a round number used before (same masks twice
would leak the difference of two updates), a participant list it cannot mask with, an
unmask request that names it dropped, asks for both secrets of one worker, or comes a
second time for a round."""

from __future__ import annotations

import os
from typing import Dict, List, Optional, Set, Tuple

import numpy as np

from jetfed.secagg import keys, masking, shares
from jetfed.secagg.common import channel_key, check_worker_id, commitment, share_associated_data
from jetfed.secagg.errors import ProtocolViolation
from jetfed.secagg.fixed_point import FixedPoint
from jetfed.secagg.messages import (MASK_KEY, SELF_MASK, EncryptedShare, KeyAdvertisement, KeyShares, MaskedInput,
                                    Member, RevealedShare, Roster, RoundStart, UnmaskRequest, UnmaskResponse)



class SecAggClient:
    """A worker's keys and protocol state (in memory only; a restarted worker re-keys)."""

    def __init__(self, worker: str, *, run_id: str, fixed_point: FixedPoint, epoch: int = 1) -> None:
        check_worker_id(worker)
        self.worker = worker
        self.run_id = run_id
        self.fixed_point = fixed_point
        self.epoch = epoch
        self._channel = keys.generate_keypair()
        self._mask = keys.generate_keypair()
        self._roster: Optional[Roster] = None
        self._members: Dict[str, Member] = {}
        self._shared_keys = False
        self._burned: Dict[str, int] = {}
        self._last_round = 0
        self._open_round: Optional[Tuple[int, Tuple[str, ...], Dict[str, int]]] = None
        self._own_self_share: Optional[int] = None
        self._cache: Dict[Tuple[str, str, bytes], bytes] = {}

    def rekey(self) -> KeyAdvertisement:
        """A new mask-key epoch: a fresh mask key pair, the old one forgotten. Needed
        after this worker masked a round it was not asked to unmask (its mask key may
        have been revealed) or when the coordinator says too few members hold its
        shares. The channel key stays (it is never shared), so the shares of other
        members this worker holds stay usable and only it runs setup again."""
        self.epoch += 1
        self._mask = keys.generate_keypair()
        self._shared_keys, self._open_round, self._own_self_share = False, None, None
        self._cache.clear()
        return self.advertise()

    def advertise(self) -> KeyAdvertisement:
        """S1: this worker's public keys."""
        return KeyAdvertisement(worker=self.worker, epoch=self.epoch, channel_public=self._channel.public,
                                mask_public=self._mask.public)

    def receive_roster(self, roster: Roster) -> None:
        """Take the (possibly grown) roster; a member's keys may change only with a new epoch."""
        if roster.run_id != self.run_id:
            raise ProtocolViolation(f"secagg: roster for run {roster.run_id!r}, this worker is in {self.run_id!r}")
        members: Dict[str, Member] = {}
        for member in roster.members:
            check_worker_id(member.worker)
            keys.check_public(member.channel_public, f"{member.worker}'s channel key")
            keys.check_public(member.mask_public, f"{member.worker}'s mask key")
            if member.worker in members or member.index < 1:
                raise ProtocolViolation(f"secagg: roster lists {member.worker!r} twice or with index {member.index}")
            old = self._members.get(member.worker)
            if old is not None and old.epoch == member.epoch and old != member:
                raise ProtocolViolation(f"secagg: roster changes {member.worker!r}'s keys without a new epoch")
            members[member.worker] = member
        if len({m.index for m in members.values()}) != len(members):
            raise ProtocolViolation("secagg: roster gives two members the same index")
        me = members.get(self.worker)
        if me is None or (me.epoch, me.channel_public, me.mask_public) != (
                self.epoch, self._channel.public, self._mask.public):
            raise ProtocolViolation("secagg: roster does not hold this worker's own keys")
        if not len(members) // 2 + 1 <= roster.threshold <= len(members) - 1:
            raise ProtocolViolation(f"secagg: threshold {roster.threshold} must exceed half of the "
                                    f"{len(members)} members and leave one to drop")
        if self._roster is not None and (roster.threshold != self._roster.threshold
                                         or self._members[self.worker].index != me.index):
            raise ProtocolViolation("secagg: roster changes the threshold or this worker's index mid-run")
        self._roster, self._members = roster, members

    def share_keys(self) -> KeyShares:
        """S2: Shamir shares of the mask private key, sealed for every other member."""
        roster = self._require_roster()
        if self._shared_keys:
            raise ProtocolViolation("secagg: this worker already shared its mask key for this epoch")
        holders = [m for m in self._members.values() if m.worker != self.worker]
        values = shares.split(self._mask.private, roster.threshold, [m.index for m in holders])
        sealed = tuple(self._seal(MASK_KEY, holder, 0, values[holder.index]) for holder in holders)
        self._shared_keys = True
        return KeyShares(worker=self.worker, epoch=self.epoch, shares=sealed)

    def check_round(self, start: RoundStart) -> None:
        """Whether this worker would mask `start` (the checks `mask` makes first), so a
        worker refuses a round at its Train header rather than after training it."""
        self._check_participants(start)

    @property
    def has_roster(self) -> bool:
        return self._roster is not None

    def mask(self, start: RoundStart, update: np.ndarray) -> MaskedInput:
        """The masked, fixed-point update for a round, with its self-mask shares."""
        roster = self._require_roster()
        participants = self._check_participants(start)
        vector = np.asarray(update).ravel()
        if vector.size != start.length:
            raise ProtocolViolation(f"secagg: round {start.round_number} expects {start.length} values, "
                                    f"the update has {vector.size}")
        masked = self.fixed_point.encode(vector)
        seed = os.urandom(shares.SECRET_BYTES)
        masking.apply_mask(masked, masking.prg(masking.self_mask_key(
            seed, run_id=self.run_id, round_number=start.round_number, owner=self.worker), vector.size), 1)
        for peer in self._pairwise_peers(participants):
            pair = masking.pair_mask_key(self._pair_secret(self._members[peer]), run_id=self.run_id,
                                         round_number=start.round_number, first=min(peer, self.worker),
                                         second=max(peer, self.worker))
            masking.apply_mask(masked, masking.prg(pair, vector.size), masking.pair_sign(self.worker, peer))
        holders = [self._members[p] for p in participants]
        values = shares.split(seed, roster.threshold, [m.index for m in holders])
        self._own_self_share = values[self._members[self.worker].index]
        sealed = tuple(self._seal(SELF_MASK, m, start.round_number, values[m.index])
                       for m in holders if m.worker != self.worker)
        epochs = {p: self._members[p].epoch for p in participants}
        self._last_round, self._open_round = start.round_number, (start.round_number, participants, epochs)
        return MaskedInput(worker=self.worker, round_number=start.round_number, vector=masked, self_shares=sealed,
                           commitment=commitment(seed, run_id=self.run_id, round_number=start.round_number,
                                                 owner=self.worker))

    def unmask(self, request: UnmaskRequest) -> UnmaskResponse:
        """Open the shares the coordinator needs, after checking it asks for nothing more."""
        roster = self._require_roster()
        if self._open_round is None or self._open_round[0] != request.round_number:
            raise ProtocolViolation(f"secagg: unmask request for round {request.round_number}, which this worker "
                                    "has no open masked input for (or already answered)")
        round_number, participants, epochs = self._open_round
        survivors, dropped = set(request.survivors), set(request.dropped)
        if (len(survivors) != len(request.survivors) or len(dropped) != len(request.dropped) or survivors & dropped
                or survivors | dropped != set(participants)):
            raise ProtocolViolation("secagg: survivors and dropped must split the round's participants exactly")
        if self.worker not in survivors:
            raise ProtocolViolation("secagg: unmask request names this worker dropped")
        if len(survivors) < roster.threshold:
            raise ProtocolViolation(f"secagg: {len(survivors)} survivors, fewer than the threshold "
                                    f"{roster.threshold}; nothing is revealed")
        opened: List[RevealedShare] = []
        seen: Set[str] = set()
        my_index = self._members[self.worker].index
        for share in request.shares:
            expected = SELF_MASK if share.owner in survivors else MASK_KEY if share.owner in dropped else None
            if expected is None or share.kind != expected or share.owner in seen or share.owner == self.worker:
                raise ProtocolViolation(f"secagg: unmask request asks for a {share.kind} share of "
                                        f"{share.owner!r}, which this round does not allow")
            wanted_round = round_number if expected == SELF_MASK else 0
            if (share.holder, share.round_number, share.owner_epoch) != (
                    self.worker, wanted_round, epochs[share.owner]):
                raise ProtocolViolation(f"secagg: the {share.kind} share of {share.owner!r} is not addressed to "
                                        "this worker for this round")
            seen.add(share.owner)
            plaintext = keys.open_sealed(self._channel_key(self._members[share.owner]), share.ciphertext,
                                         share_associated_data(self.run_id, share))
            opened.append(RevealedShare(owner=share.owner, kind=share.kind, x=my_index, y=plaintext))
        if self._own_self_share is not None:
            opened.append(RevealedShare(owner=self.worker, kind=SELF_MASK, x=my_index,
                                        y=shares.encode_share(self._own_self_share)))
        for peer in dropped:
            self._burned[peer] = epochs[peer]
        self._open_round, self._own_self_share = None, None
        return UnmaskResponse(worker=self.worker, round_number=round_number, shares=tuple(opened))

    def _pairwise_peers(self, participants: Tuple[str, ...]) -> Tuple[str, ...]:
        """Whom this worker masks with: every other participant (SecAgg+'s neighbour
        graph would narrow this to k of them)."""
        return tuple(p for p in participants if p != self.worker)

    def _check_participants(self, start: RoundStart) -> Tuple[str, ...]:
        roster = self._require_roster()
        if start.round_number <= self._last_round:
            raise ProtocolViolation(f"secagg: round {start.round_number} is not after round {self._last_round}; "
                                    "masks are never reused")
        if self._open_round is not None:
            raise ProtocolViolation(f"secagg: this worker masked round {self._open_round[0]} and was not asked to "
                                    "unmask it, so its mask key may have been revealed; it must re-key first")
        participants = tuple(start.participants)
        if len(set(participants)) != len(participants) or self.worker not in participants:
            raise ProtocolViolation("secagg: the round's participants repeat a name or leave this worker out")
        if len(participants) < roster.threshold:
            raise ProtocolViolation(f"secagg: {len(participants)} participants, fewer than the threshold "
                                    f"{roster.threshold}")
        for peer in participants:
            member = self._members.get(peer)
            if member is None:
                raise ProtocolViolation(f"secagg: participant {peer!r} is not in the roster")
            if self._burned.get(peer) == member.epoch:
                raise ProtocolViolation(f"secagg: {peer!r}'s mask key was revealed when it dropped; it must "
                                        "re-key before it takes part again")
        self.fixed_point.check_capacity(len(participants))
        return participants

    def _require_roster(self) -> Roster:
        if self._roster is None:
            raise ProtocolViolation("secagg: no roster yet (setup has not run)")
        return self._roster

    def _pair_secret(self, peer: Member) -> bytes:
        key = ("mask", peer.worker, peer.mask_public)
        if key not in self._cache:
            self._cache[key] = keys.agree(self._mask.private, peer.mask_public)
        return self._cache[key]

    def _channel_key(self, peer: Member) -> bytes:
        key = ("channel", peer.worker, peer.channel_public)
        if key not in self._cache:
            self._cache[key] = channel_key(keys.agree(self._channel.private, peer.channel_public),
                                           run_id=self.run_id, a=self.worker, a_public=self._channel.public,
                                           b=peer.worker, b_public=peer.channel_public)
        return self._cache[key]

    def _seal(self, kind: str, holder: Member, round_number: int, value: int) -> EncryptedShare:
        blank = EncryptedShare(owner=self.worker, holder=holder.worker, kind=kind, owner_epoch=self.epoch,
                               round_number=round_number, ciphertext=b"")
        sealed = keys.seal(self._channel_key(holder), shares.encode_share(value),
                           share_associated_data(self.run_id, blank))
        return EncryptedShare(owner=blank.owner, holder=blank.holder, kind=kind, owner_epoch=blank.owner_epoch,
                              round_number=round_number, ciphertext=sealed)
