"""What the worker and the coordinator derive identically: labels, channel keys,
associated data and commitments."""

from __future__ import annotations

from jetfed.secagg import keys
from jetfed.secagg.messages import PROTOCOL, EncryptedShare


def label(*parts: object) -> bytes:
    """An unambiguous byte string from parts (ids never contain '|': checked at the roster)."""
    return "|".join(str(part) for part in parts).encode()


def channel_key(shared: bytes, *, run_id: str, a: str, a_epoch: int, b: str, b_epoch: int) -> bytes:
    """The AEAD key between two workers at their epochs, the same from either side."""
    (first, first_epoch), (second, second_epoch) = sorted([(a, a_epoch), (b, b_epoch)])
    return keys.derive(shared, label(PROTOCOL, "channel", run_id, first, first_epoch, second, second_epoch))


def share_associated_data(run_id: str, share: EncryptedShare) -> bytes:
    """What a share's ciphertext is bound to, so it cannot be relabelled or replayed."""
    return label(PROTOCOL, "share", run_id, share.kind, share.owner, share.owner_epoch, share.holder,
                 share.holder_epoch, share.round_number)


def commitment(seed: bytes, *, run_id: str, round_number: int, owner: str) -> bytes:
    """A binding, hiding commitment to a 32-byte random self-mask seed."""
    return keys.sha256(label(PROTOCOL, "commit", run_id, owner, round_number).hex().encode() + seed)


def check_worker_id(worker: str) -> None:
    """Refuse ids that would make labels ambiguous."""
    from jetfed.secagg.errors import ProtocolViolation
    if not isinstance(worker, str) or not worker or "|" in worker or len(worker) > 256:
        raise ProtocolViolation(f"secagg: {worker!r} is not a usable worker id (non-empty, no '|', <= 256 chars)")
