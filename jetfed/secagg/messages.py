"""The messages of the protocol, as plain frozen dataclasses. The services map them to
protobuf at their border (one converter each way); nothing here knows gRPC.

Flow (docs/secagg.md): KeyAdvertisement -> Roster -> KeyShares once per run or key
epoch; RoundStart (on the Train request) -> MaskedInput (on the Train response) ->
UnmaskRequest -> UnmaskResponse, the one extra round trip per round."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import numpy as np

MASK_KEY = "mask-key"
SELF_MASK = "self-mask"
PROTOCOL = "jetfed-secagg/v1"


@dataclass(frozen=True)
class KeyAdvertisement:
    """A worker's public keys for one key epoch (a new epoch replaces a burned key)."""

    worker: str
    epoch: int
    channel_public: bytes
    mask_public: bytes


@dataclass(frozen=True)
class Member:
    """One worker of the roster: its Shamir index and public keys."""

    worker: str
    index: int
    epoch: int
    channel_public: bytes
    mask_public: bytes


@dataclass(frozen=True)
class Roster:
    """Who takes part in the run's secure aggregation, and the threshold."""

    run_id: str
    threshold: int
    members: Tuple[Member, ...]


@dataclass(frozen=True)
class EncryptedShare:
    """A Shamir share sealed by `owner` for `holder` (under their channel keys); the
    coordinator relays and stores it without being able to read it. `owner_epoch` names
    the owner's mask key; `round_number` is 0 for mask-key shares."""

    owner: str
    holder: str
    kind: str
    owner_epoch: int
    round_number: int
    ciphertext: bytes


@dataclass(frozen=True)
class KeyShares:
    """A worker's shares of its mask private key, one per other member."""

    worker: str
    epoch: int
    shares: Tuple[EncryptedShare, ...]


@dataclass(frozen=True)
class RoundStart:
    """Rides on the Train request: the round (never reused: a retried round gets a new
    number) and who masks with whom."""

    round_number: int
    participants: Tuple[str, ...]
    length: int


@dataclass(frozen=True)
class MaskedInput:
    """Rides on the Train response: the masked vector, shares of this round's self-mask
    seed for the other participants, and a commitment to that seed."""

    worker: str
    round_number: int
    vector: np.ndarray
    self_shares: Tuple[EncryptedShare, ...]
    commitment: bytes


@dataclass(frozen=True)
class UnmaskRequest:
    """The extra round trip: who survived, who dropped, and the ciphertexts this
    worker must open (self-mask shares of survivors, mask-key shares of the dropped)."""

    round_number: int
    survivors: Tuple[str, ...]
    dropped: Tuple[str, ...]
    shares: Tuple[EncryptedShare, ...]


@dataclass(frozen=True)
class RevealedShare:
    """A share opened by its holder: `x` is the holder's index, `y` the field element."""

    owner: str
    kind: str
    x: int
    y: bytes


@dataclass(frozen=True)
class UnmaskResponse:
    """A survivor's opened shares for one round."""

    worker: str
    round_number: int
    shares: Tuple[RevealedShare, ...]
