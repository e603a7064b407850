"""Key agreement, key derivation and share encryption, all from `cryptography`.

`cryptography` is imported lazily: it is the `certs` extra, not a runtime dependency of
every board, so a run that asks for secure aggregation on a machine without it is
refused with one line naming what to install (cryptography 47 is the last release with
wheels for Python 3.8, abi3 on aarch64 and x86-64)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Optional

from jetfed.secagg.errors import ProtocolViolation, SecAggUnavailable

KEY_BYTES = 32
NONCE_BYTES = 12
_lib: Optional[SimpleNamespace] = None


def crypto() -> SimpleNamespace:
    """The parts of `cryptography` secure aggregation uses, imported once."""
    global _lib
    if _lib is None:
        try:
            from cryptography.exceptions import InvalidTag
            from cryptography.hazmat.primitives import hashes
            from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
            from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
            from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
            from cryptography.hazmat.primitives.kdf.hkdf import HKDF
        except ImportError as exc:
            raise SecAggUnavailable("secure aggregation needs the 'cryptography' package on this machine: "
                                    "pip install 'cryptography>=42' (or pip install 'jetfed[certs]')") from exc
        _lib = SimpleNamespace(InvalidTag=InvalidTag, hashes=hashes, X25519PrivateKey=X25519PrivateKey,
                               X25519PublicKey=X25519PublicKey, Cipher=Cipher, algorithms=algorithms,
                               ChaCha20Poly1305=ChaCha20Poly1305, HKDF=HKDF)
    return _lib


@dataclass(frozen=True)
class KeyPair:
    """An X25519 key pair as raw bytes (never pickled, never written by this package)."""

    private: bytes
    public: bytes

    def __repr__(self) -> str:
        return f"KeyPair(public={self.public.hex()[:16]}...)"


def generate_keypair() -> KeyPair:
    """A fresh X25519 key pair from the OS's random source."""
    private = os.urandom(KEY_BYTES)
    return KeyPair(private=private, public=public_of(private))


def public_of(private: bytes) -> bytes:
    """The X25519 public key of a raw 32-byte private key."""
    lib = crypto()
    key = lib.X25519PrivateKey.from_private_bytes(private)
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def check_public(public: bytes, what: str) -> None:
    """Refuse anything that is not 32 bytes before it reaches X25519."""
    if not isinstance(public, (bytes, bytearray)) or len(public) != KEY_BYTES:
        raise ProtocolViolation(f"secagg: {what} must be {KEY_BYTES} bytes")


def agree(private: bytes, peer_public: bytes) -> bytes:
    """The raw X25519 shared secret; a low-order peer key is refused (it would make
    the secret all zeros, known to everyone)."""
    lib = crypto()
    check_public(peer_public, "a peer's public key")
    try:
        return lib.X25519PrivateKey.from_private_bytes(private).exchange(
            lib.X25519PublicKey.from_public_bytes(bytes(peer_public)))
    except ValueError as exc:
        raise ProtocolViolation(f"secagg: a peer's public key is unusable ({exc})") from exc


def derive(secret: bytes, info: bytes, length: int = KEY_BYTES) -> bytes:
    """HKDF-SHA256 of a secret; `info` binds what the key is for (run, pair, round)."""
    lib = crypto()
    return lib.HKDF(algorithm=lib.hashes.SHA256(), length=length, salt=None, info=info).derive(secret)


def seal(key: bytes, plaintext: bytes, associated: bytes) -> bytes:
    """ChaCha20-Poly1305 with a random nonce, returned as nonce || ciphertext || tag."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + crypto().ChaCha20Poly1305(key).encrypt(nonce, plaintext, associated)


def open_sealed(key: bytes, blob: bytes, associated: bytes) -> bytes:
    """The plaintext of `seal`, or ProtocolViolation when the blob was altered, was sealed
    for another holder, or is being replayed under another label."""
    lib = crypto()
    if len(blob) < NONCE_BYTES + 16:
        raise ProtocolViolation("secagg: an encrypted share is too short")
    try:
        return lib.ChaCha20Poly1305(key).decrypt(bytes(blob[:NONCE_BYTES]), bytes(blob[NONCE_BYTES:]), associated)
    except lib.InvalidTag as exc:
        raise ProtocolViolation("secagg: an encrypted share does not authenticate for this holder, owner, "
                                "kind and round") from exc


def sha256(data: bytes) -> bytes:
    """SHA-256, for the self-mask seed's commitment."""
    lib = crypto()
    digest = lib.hashes.Hash(lib.hashes.SHA256())
    digest.update(data)
    return digest.finalize()
