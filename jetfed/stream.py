"""Weights cross the wire as a header followed by ordered chunks, so a model of any size
fits under gRPC's per-message limit and a receiver can refuse a stream early."""

from __future__ import annotations

import hashlib
from typing import Iterator, Optional, Tuple, Union

from jetfed.errors import BadStream, CorruptPayload, InvalidConfig, PayloadTooLarge

DEFAULT_CHUNK_BYTES = 1 << 20
MAX_CHUNK_BYTES = 3 << 20
DEFAULT_MAX_PAYLOAD_BYTES = 512 << 20
MAX_MESSAGE_BYTES = 4 << 20
PAYLOAD_MARGIN_BYTES = 1 << 20


def payload_limit(model_bytes: int) -> int:
    """A service's default --max-payload-bytes: the largest payload its model can have,
    plus 10% and 1 MiB, so no stream buffers much more than a model while a model
    never meets the limit."""
    return model_bytes + model_bytes // 10 + PAYLOAD_MARGIN_BYTES


def check_chunk_size(chunk_bytes: int) -> int:
    if not 1 <= chunk_bytes <= MAX_CHUNK_BYTES:
        raise InvalidConfig(f"chunk_bytes: {chunk_bytes} is outside 1..{MAX_CHUNK_BYTES}")
    return chunk_bytes


def split(payload: Union[bytes, bytearray], chunk_bytes: int) -> Iterator[Tuple[int, bytes]]:
    """(offset, slice) pairs covering the payload; an empty payload yields nothing."""
    view = memoryview(payload)
    for offset in range(0, len(payload), chunk_bytes):
        yield offset, bytes(view[offset:offset + chunk_bytes])


class Received(bytearray):
    """A payload as it arrived, with the SHA-256 (hex) of its bytes taken while they
    arrived: codec.decode(manifest, payload, payload.sha256) need not read it again."""

    sha256: str = ""


class PayloadAssembler:
    """Collects chunks in order into one buffer of the announced size, refusing gaps,
    overlaps and overruns as they happen, and hashes each chunk as it arrives: the
    payload is copied once (chunk to buffer) and read once (the hash), so the receiver
    neither grows a buffer nor hashes the whole again. `finish` returns the buffer and
    its SHA-256, as one Received.

    The buffer is allocated by the first chunk, not at construction: a stream refused
    at its header (wire.read_weight_stream) or one that never sends a byte holds none."""

    def __init__(self, total_bytes: int, max_bytes: int) -> None:
        if total_bytes > max_bytes:
            raise PayloadTooLarge(
                f"manifest.total_bytes: {total_bytes} bytes exceeds this service's limit of {max_bytes}"
            )
        self._total = total_bytes
        self._buffer: Optional[Received] = None
        self._view: Optional[memoryview] = None
        self._filled = 0
        self._hash = hashlib.sha256()

    def add(self, offset: int, data: bytes) -> None:
        if offset != self._filled:
            raise BadStream(f"chunk.offset: got {offset}, expected {self._filled} (chunks out of order)")
        end = self._filled + len(data)
        if end > self._total:
            raise CorruptPayload(
                f"chunk: stream carries more than the announced {self._total} bytes"
            )
        if self._view is None:
            self._buffer = Received(self._total)
            self._view = memoryview(self._buffer)
        self._view[self._filled:end] = data
        self._hash.update(data)
        self._filled = end

    def finish(self) -> Received:
        """The whole payload, once every announced byte is in."""
        if self._filled != self._total:
            raise CorruptPayload(
                f"payload: stream ended after {self._filled} of {self._total} bytes"
            )
        buffer = self._buffer if self._buffer is not None else Received()
        if self._view is not None:
            self._view.release()
            self._view = None
        buffer.sha256 = self._hash.hexdigest()
        return buffer
