"""Masks: a ChaCha20 keystream (RFC 8439) read as little-endian uint32.

A cryptographic PRG, so a mask is indistinguishable from uniform without its seed, and
defined byte for byte by its RFC, so a board and the coordinator expand the same seed
to the same vector whatever CPU or numpy version each runs. Every mask key is derived
through HKDF with the run, the round and the parties in `info`, so keys agreed once per
run give fresh masks every round."""

from __future__ import annotations

import numpy as np

from jetfed.secagg.common import label as _label
from jetfed.secagg.keys import crypto, derive

_ZERO_NONCE = bytes(16)  # counter 0, nonce 0: each key is used for one stream only
_CHUNK_BYTES = 1 << 22


def prg(key: bytes, length: int) -> np.ndarray:
    """`length` uint32 words of ChaCha20 keystream under a 32-byte key."""
    lib = crypto()
    out = np.empty(length, dtype="<u4")
    encryptor = lib.Cipher(lib.algorithms.ChaCha20(key, _ZERO_NONCE), mode=None).encryptor()
    view = memoryview(out.view(np.uint8))  # type: ignore[arg-type]  # numpy's stubs declare __buffer__ for 3.12+ only
    zeros = bytes(min(_CHUNK_BYTES, view.nbytes))
    for start in range(0, view.nbytes, _CHUNK_BYTES):
        size = min(_CHUNK_BYTES, view.nbytes - start)
        encryptor.update_into(zeros[:size] if size < len(zeros) else zeros, view[start:start + size])
    return out.astype(np.uint32, copy=False)


def pair_mask_key(shared: bytes, *, run_id: str, round_number: int, first: str, second: str) -> bytes:
    """The round's key for the mask between two workers (`first < second`), from their
    X25519 secret."""
    return derive(shared, _label("jetfed-secagg/v1", "pair-mask", run_id, first, second, round_number))


def self_mask_key(seed: bytes, *, run_id: str, round_number: int, owner: str) -> bytes:
    """The key of a worker's self-mask in a round, from its per-round seed."""
    return derive(seed, _label("jetfed-secagg/v1", "self-mask", run_id, owner, round_number))


def pair_sign(owner: str, peer: str) -> int:
    """+1 when `owner` adds the pair's mask, -1 when it subtracts it."""
    return 1 if owner < peer else -1


def apply_mask(vector: np.ndarray, mask: np.ndarray, sign: int) -> None:
    """vector += sign * mask, in place, mod 2^32."""
    if sign > 0:
        np.add(vector, mask, out=vector)
    else:
        np.subtract(vector, mask, out=vector)
