"""bench/netem.py's emulated link (rate, then delay, a bounded queue), its packet
classifier and its namespace commands: the arithmetic its 4G figures rest on, checked
without root or a network."""

import importlib.util
import struct
import sys
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[2] / "bench" / "netem.py"
_SPEC = importlib.util.spec_from_file_location("bench_netem", _PATH)
netem = importlib.util.module_from_spec(_SPEC)
sys.modules[_SPEC.name] = netem  # dataclasses look their module up
_SPEC.loader.exec_module(netem)


def test_a_packet_is_serialised_at_the_rate_then_delayed():
    link = netem.Link(rate_bps=5e6, delay_s=0.025)
    # 1500 bytes at 5 Mbit/s: 2.4 ms on the wire, then 25 ms in flight
    assert link.admit(10.0, 1500) == pytest.approx(10.0 + 0.0024 + 0.025)


def test_packets_queue_behind_each_other_and_the_queue_drains():
    link = netem.Link(rate_bps=8e6, delay_s=0.0)  # 1 byte a microsecond
    assert link.admit(0.0, 1000) == pytest.approx(0.001)
    assert link.admit(0.0, 1000) == pytest.approx(0.002)
    # after the link went idle a packet starts at once
    assert link.admit(1.0, 1000) == pytest.approx(1.001)
    assert (link.packets, link.bytes, link.dropped) == (3, 3000, 0)


def test_a_full_queue_drops_until_a_packet_has_left():
    link = netem.Link(rate_bps=8e6, delay_s=0.0, limit=2)
    assert link.admit(0.0, 1000) is not None
    assert link.admit(0.0, 1000) is not None
    assert link.admit(0.0, 1000) is None
    assert link.dropped == 1
    assert link.admit(0.0015, 1000) == pytest.approx(0.003)


def test_unlimited_rate_only_delays():
    assert netem.Link(rate_bps=0, delay_s=0.025).admit(2.0, 65000) == pytest.approx(2.025)


def _tcp(source: int, destination: int, fragment: int = 0) -> bytes:
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40, 1, fragment, 64, 6, 0, bytes(4), bytes(4))
    return ip + struct.pack("!HH", source, destination) + bytes(16)


def test_the_worker_port_is_the_source_going_up_and_the_destination_going_down():
    assert netem.flow_port(_tcp(8777, 40000), uplink=True) == 8777
    assert netem.flow_port(_tcp(40000, 8778), uplink=False) == 8778
    assert netem.flow_port(_tcp(8777, 40000, fragment=5), uplink=True) == 0  # a later fragment has no ports
    assert netem.flow_port(b"\x60" + bytes(47), uplink=True) == 0  # IPv6


def test_each_worker_gets_its_own_link_unless_shared():
    links = netem.Links(5e6, 0.025, shared=False)
    assert links.get(8777) is not links.get(8778)
    shared = netem.Links(5e6, 0.025, shared=True)
    assert shared.get(8777) is shared.get(8778)


def test_namespace_commands_make_both_ends_and_address_them_point_to_point():
    commands = netem.namespace_commands("jetfed-4g-1", "jetfed-4g-1-boards")
    assert commands[0] == ["ip", "netns", "add", "jetfed-4g-1"]
    assert ["ip", "-n", "jetfed-4g-1", "addr", "add", "10.77.0.1", "peer", "10.77.0.2", "dev", netem.TUN] in commands
    assert ["ip", "-n", "jetfed-4g-1-boards", "addr", "add", "10.77.0.2", "peer", "10.77.0.1",
            "dev", netem.TUN] in commands
