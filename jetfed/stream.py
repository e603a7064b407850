"""Weights cross the wire as a header followed by ordered chunks, so a model of any size
fits under gRPC's per-message limit and a receiver can refuse a stream early."""

from __future__ import annotations

from typing import Iterator, Tuple

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


def split(payload: bytes, chunk_bytes: int) -> Iterator[Tuple[int, bytes]]:
    """(offset, slice) pairs covering the payload; an empty payload yields nothing."""
    view = memoryview(payload)
    for offset in range(0, len(payload), chunk_bytes):
        yield offset, bytes(view[offset:offset + chunk_bytes])


class PayloadAssembler:
    """Collects chunks in order, refusing gaps, overlaps and overruns as they happen."""

    def __init__(self, total_bytes: int, max_bytes: int) -> None:
        if total_bytes > max_bytes:
            raise PayloadTooLarge(
                f"manifest.total_bytes: {total_bytes} bytes exceeds this service's limit of {max_bytes}"
            )
        self._total = total_bytes
        self._buffer = bytearray()

    def add(self, offset: int, data: bytes) -> None:
        if offset != len(self._buffer):
            raise BadStream(f"chunk.offset: got {offset}, expected {len(self._buffer)} (chunks out of order)")
        if len(self._buffer) + len(data) > self._total:
            raise CorruptPayload(
                f"chunk: stream carries more than the announced {self._total} bytes"
            )
        self._buffer += data

    def finish(self) -> bytes:
        if len(self._buffer) != self._total:
            raise CorruptPayload(
                f"payload: stream ended after {len(self._buffer)} of {self._total} bytes"
            )
        return bytes(self._buffer)
