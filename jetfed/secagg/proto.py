"""The border between the protocol's dataclass messages and protobuf (secagg.proto):
one converter each way, shared by the worker and the coordinator. A message from the
wire that cannot be a protocol message (unknown share kind, a number past 32 bits) is
refused here as a ProtocolViolation naming the field; everything else is checked by
SecAggClient and SecAggServer."""

from __future__ import annotations

from typing import Dict, Iterable, Tuple

import numpy as np

from jetfed.secagg.errors import ProtocolViolation
from jetfed.secagg.fixed_point import FixedPoint
from jetfed.secagg.messages import (MASK_KEY, SELF_MASK, EncryptedShare, KeyAdvertisement, KeyShares, MaskedInput,
                                    Member, RevealedShare, Roster, RoundStart, UnmaskRequest, UnmaskResponse)
from jetfed.v1 import secagg_pb2

_KINDS = {MASK_KEY: secagg_pb2.SHARE_KIND_MASK_KEY, SELF_MASK: secagg_pb2.SHARE_KIND_SELF_MASK}
_KIND_NAMES: Dict[int, str] = {value: name for name, value in _KINDS.items()}
# Round numbers, epochs and indices travel as uint64 so a wrapped value is refused, not read.
MAX_NUMBER = 2**32 - 1
# The masked vector's one tensor in the Train result's payload.
MASKED_TENSOR = "secagg/masked"


def _number(value: int, field: str) -> int:
    if not 0 <= value <= MAX_NUMBER:
        raise ProtocolViolation(f"secagg: {field} {value} is not in 0..{MAX_NUMBER}")
    return int(value)


def _kind(value: int) -> str:
    if value not in _KIND_NAMES:
        raise ProtocolViolation(f"secagg: share kind {value} is not one this worker knows")
    return _KIND_NAMES[value]


def share_to_proto(share: EncryptedShare) -> secagg_pb2.EncryptedShare:
    return secagg_pb2.EncryptedShare(owner=share.owner, holder=share.holder, kind=_KINDS[share.kind],
                                     owner_epoch=share.owner_epoch, round=share.round_number,
                                     ciphertext=share.ciphertext)


def share_from_proto(message: secagg_pb2.EncryptedShare) -> EncryptedShare:
    return EncryptedShare(owner=message.owner, holder=message.holder, kind=_kind(message.kind),
                          owner_epoch=_number(message.owner_epoch, "owner_epoch"),
                          round_number=_number(message.round, "round"), ciphertext=bytes(message.ciphertext))


def shares_from_proto(messages: Iterable[secagg_pb2.EncryptedShare]) -> Tuple[EncryptedShare, ...]:
    return tuple(share_from_proto(m) for m in messages)


def encoding_to_proto(fixed_point: FixedPoint) -> secagg_pb2.FixedPointEncoding:
    return secagg_pb2.FixedPointEncoding(clip=fixed_point.clip, scale=fixed_point.scale)


def encoding_from_proto(message: secagg_pb2.FixedPointEncoding) -> FixedPoint:
    return FixedPoint(clip=message.clip, scale=message.scale)


def advertisement_to_proto(advert: KeyAdvertisement) -> secagg_pb2.SecAggAdvertiseResponse:
    return secagg_pb2.SecAggAdvertiseResponse(worker=advert.worker, epoch=advert.epoch,
                                              channel_public=advert.channel_public, mask_public=advert.mask_public)


def advertisement_from_proto(message: secagg_pb2.SecAggAdvertiseResponse) -> KeyAdvertisement:
    return KeyAdvertisement(worker=message.worker, epoch=_number(message.epoch, "epoch"),
                            channel_public=bytes(message.channel_public), mask_public=bytes(message.mask_public))


def roster_to_proto(roster: Roster) -> secagg_pb2.SecAggRoster:
    return secagg_pb2.SecAggRoster(run_id=roster.run_id, threshold=roster.threshold, members=[
        secagg_pb2.SecAggMember(worker=m.worker, index=m.index, epoch=m.epoch, channel_public=m.channel_public,
                                mask_public=m.mask_public) for m in roster.members])


def roster_from_proto(message: secagg_pb2.SecAggRoster) -> Roster:
    return Roster(run_id=message.run_id, threshold=_number(message.threshold, "threshold"), members=tuple(
        Member(worker=m.worker, index=_number(m.index, "index"), epoch=_number(m.epoch, "epoch"),
               channel_public=bytes(m.channel_public), mask_public=bytes(m.mask_public)) for m in message.members))


def key_shares_to_proto(message: KeyShares) -> secagg_pb2.SecAggShareKeysResponse:
    return secagg_pb2.SecAggShareKeysResponse(worker=message.worker, epoch=message.epoch,
                                              shares=[share_to_proto(s) for s in message.shares])


def key_shares_from_proto(message: secagg_pb2.SecAggShareKeysResponse) -> KeyShares:
    return KeyShares(worker=message.worker, epoch=_number(message.epoch, "epoch"),
                     shares=shares_from_proto(message.shares))


def round_start_to_proto(start: RoundStart, roster: Roster, weight_unit: float) -> secagg_pb2.SecAggRoundStart:
    return secagg_pb2.SecAggRoundStart(round=start.round_number, participants=list(start.participants),
                                       length=start.length, roster=roster_to_proto(roster), weight_unit=weight_unit)


def round_start_from_proto(message: secagg_pb2.SecAggRoundStart) -> RoundStart:
    return RoundStart(round_number=_number(message.round, "round"), participants=tuple(message.participants),
                      length=_number(message.length, "length"))


def masked_input_to_proto(message: MaskedInput) -> secagg_pb2.SecAggMaskedInput:
    return secagg_pb2.SecAggMaskedInput(round=message.round_number, commitment=message.commitment,
                                        self_shares=[share_to_proto(s) for s in message.self_shares])


def masked_input_from_proto(worker: str, message: secagg_pb2.SecAggMaskedInput, vector: np.ndarray) -> MaskedInput:
    return MaskedInput(worker=worker, round_number=_number(message.round, "round"), vector=vector,
                       self_shares=shares_from_proto(message.self_shares), commitment=bytes(message.commitment))


def unmask_request_to_proto(run_id: str, request: UnmaskRequest) -> secagg_pb2.SecAggUnmaskRequest:
    return secagg_pb2.SecAggUnmaskRequest(run_id=run_id, round=request.round_number,
                                          survivors=list(request.survivors), dropped=list(request.dropped),
                                          shares=[share_to_proto(s) for s in request.shares])


def unmask_request_from_proto(message: secagg_pb2.SecAggUnmaskRequest) -> UnmaskRequest:
    return UnmaskRequest(round_number=_number(message.round, "round"), survivors=tuple(message.survivors),
                         dropped=tuple(message.dropped), shares=shares_from_proto(message.shares))


def unmask_response_to_proto(response: UnmaskResponse) -> secagg_pb2.SecAggUnmaskResponse:
    return secagg_pb2.SecAggUnmaskResponse(worker=response.worker, round=response.round_number, shares=[
        secagg_pb2.RevealedShare(owner=s.owner, kind=_KINDS[s.kind], x=s.x, y=s.y) for s in response.shares])


def unmask_response_from_proto(message: secagg_pb2.SecAggUnmaskResponse) -> UnmaskResponse:
    return UnmaskResponse(worker=message.worker, round_number=_number(message.round, "round"), shares=tuple(
        RevealedShare(owner=s.owner, kind=_kind(s.kind), x=_number(s.x, "x"), y=bytes(s.y))
        for s in message.shares))
