"""What the worker and the coordinator derive identically: labels, channel keys,
associated data and commitments."""

from __future__ import annotations

from jetfed.secagg import keys
from jetfed.secagg.messages import PROTOCOL, EncryptedShare


def label(*parts: object) -> bytes:
    """An unambiguous byte string from parts (ids never contain '|': checked at the roster)."""
    return "|".join(str(part) for part in parts).encode()


def channel_key(shared: bytes, *, run_id: str, a: str, a_public: bytes, b: str, b_public: bytes) -> bytes:
    """The AEAD key between two workers' channel keys, the same from either side. It is
    bound to the channel keys, not to the mask-key epoch: a worker that re-keys its mask
    key keeps its channel key, so it can still open the shares it holds."""
    (first, first_public), (second, second_public) = sorted([(a, a_public), (b, b_public)])
    return keys.derive(shared, label(PROTOCOL, "channel", run_id, first, first_public.hex(), second,
                                     second_public.hex()))


def share_associated_data(run_id: str, share: EncryptedShare) -> bytes:
    """What a share's ciphertext is bound to, so it cannot be relabelled or replayed."""
    return label(PROTOCOL, "share", run_id, share.kind, share.owner, share.owner_epoch, share.holder,
                 share.round_number)


def commitment(seed: bytes, *, run_id: str, round_number: int, owner: str) -> bytes:
    """A binding, hiding commitment to a 32-byte random self-mask seed."""
    return keys.sha256(label(PROTOCOL, "commit", run_id, owner, round_number).hex().encode() + seed)


def check_worker_id(worker: str) -> None:
    """Refuse ids that would make labels ambiguous."""
    from jetfed.secagg.errors import ProtocolViolation
    if not isinstance(worker, str) or not worker or "|" in worker or len(worker) > 256:
        raise ProtocolViolation(f"secagg: {worker!r} is not a usable worker id (non-empty, no '|', <= 256 chars)")
