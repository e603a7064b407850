from __future__ import annotations

import hashlib

import pytest

from jetfed.errors import BadStream, CorruptPayload, InvalidConfig, PayloadTooLarge
from jetfed.stream import MAX_CHUNK_BYTES, PayloadAssembler, Received, check_chunk_size, split

PAYLOAD = bytes(range(256)) * 4 + b"tail"


@pytest.mark.parametrize("chunk_bytes", [1, 7, 256, len(PAYLOAD) - 1, len(PAYLOAD), len(PAYLOAD) + 100])
def test_split_covers_the_payload_exactly(chunk_bytes):
    chunks = list(split(PAYLOAD, chunk_bytes))
    assert b"".join(data for _, data in chunks) == PAYLOAD
    assert [offset for offset, _ in chunks] == list(range(0, len(PAYLOAD), chunk_bytes))
    assert all(len(data) == chunk_bytes for _, data in chunks[:-1])
    assert 1 <= len(chunks[-1][1]) <= chunk_bytes
    assert all(type(data) is bytes for _, data in chunks)


def test_split_sizes_for_an_uneven_payload():
    assert [(o, len(d)) for o, d in split(b"x" * 10, 4)] == [(0, 4), (4, 4), (8, 2)]


def test_split_of_an_empty_payload_yields_nothing():
    assert list(split(b"", 4)) == []


def test_assembler_rebuilds_chunks_in_order():
    assembler = PayloadAssembler(len(PAYLOAD), max_bytes=len(PAYLOAD))
    for offset, data in split(PAYLOAD, 100):
        assembler.add(offset, data)
    assert assembler.finish() == PAYLOAD


def test_assembler_accepts_an_empty_payload():
    assert PayloadAssembler(0, max_bytes=10).finish() == b""


def test_out_of_order_chunk_is_a_bad_stream():
    assembler = PayloadAssembler(10, max_bytes=100)
    assembler.add(0, b"abcd")
    with pytest.raises(BadStream, match="got 8, expected 4"):
        assembler.add(8, b"ij")


def test_repeated_chunk_is_a_bad_stream():
    assembler = PayloadAssembler(10, max_bytes=100)
    assembler.add(0, b"abcd")
    with pytest.raises(BadStream, match="offset"):
        assembler.add(0, b"abcd")


def test_overrun_is_corrupt():
    assembler = PayloadAssembler(5, max_bytes=100)
    assembler.add(0, b"abcd")
    with pytest.raises(CorruptPayload, match="more than the announced 5"):
        assembler.add(4, b"ef")


def test_short_stream_is_corrupt_on_finish():
    assembler = PayloadAssembler(5, max_bytes=100)
    assembler.add(0, b"abc")
    with pytest.raises(CorruptPayload, match="after 3 of 5 bytes"):
        assembler.finish()


def test_oversized_announcement_is_refused_at_construction():
    with pytest.raises(PayloadTooLarge, match="total_bytes: 101"):
        PayloadAssembler(101, max_bytes=100)
    PayloadAssembler(100, max_bytes=100)


@pytest.mark.parametrize("good", [1, 1 << 20, MAX_CHUNK_BYTES])
def test_chunk_size_in_range_is_returned(good):
    assert check_chunk_size(good) == good


@pytest.mark.parametrize("bad", [0, -1, MAX_CHUNK_BYTES + 1])
def test_chunk_size_out_of_range_is_invalid(bad):
    with pytest.raises(InvalidConfig, match=r"^chunk_bytes: "):
        check_chunk_size(bad)


# The assembler hashes as it receives, into one buffer of the announced size.


def test_assembler_hashes_what_it_received():
    assembler = PayloadAssembler(len(PAYLOAD), max_bytes=len(PAYLOAD))
    for offset, data in split(PAYLOAD, 100):
        assembler.add(offset, data)
    received = assembler.finish()
    assert isinstance(received, Received)
    assert received.sha256 == hashlib.sha256(PAYLOAD).hexdigest()


def test_an_empty_payload_has_the_empty_digest():
    assert PayloadAssembler(0, max_bytes=0).finish().sha256 == hashlib.sha256(b"").hexdigest()


def test_a_chunk_changed_on_the_way_changes_the_digest():
    assembler = PayloadAssembler(len(PAYLOAD), max_bytes=len(PAYLOAD))
    for offset, data in split(PAYLOAD, 100):
        assembler.add(offset, data if offset != 200 else b"\x00" + data[1:])
    received = assembler.finish()
    assert received != PAYLOAD
    assert received.sha256 == hashlib.sha256(received).hexdigest() != hashlib.sha256(PAYLOAD).hexdigest()


def test_an_overrun_in_a_later_chunk_keeps_nothing_of_it():
    assembler = PayloadAssembler(6, max_bytes=100)
    assembler.add(0, b"abcd")
    with pytest.raises(CorruptPayload, match="more than the announced 6"):
        assembler.add(4, b"efg")
    assembler.add(4, b"ef")  # the refused chunk moved nothing
    assert assembler.finish() == b"abcdef"


def test_an_announced_total_costs_nothing_before_its_first_chunk():
    """A header may announce up to the limit; the buffer comes with the first byte, so a
    stream refused at its header, or one that stalls, holds nothing (1 TiB here)."""
    PayloadAssembler(1 << 40, max_bytes=1 << 40)
