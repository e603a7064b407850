"""Workers named by DNS (coordinator.discovery): the HOST:PORT setting, how answers
become names (one name, one worker), and a lookup that fails or hangs never holding a
round. The resolver and the GetInfo probe are stubbed at their seams here; the
integration test puts real workers behind the resolver seam."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Dict, List

import pytest

from coordinator.cli import parse_args, settings_from
from coordinator.config_file import load_config
from coordinator.discovery import (
    Address, NotAWorker, WorkerDns, assign, dial, parse_target, resolve_tcp,
)
from coordinator.failures import Failure, Kind
from jetfed.errors import InvalidConfig

TARGET = "jetfed-workers.jetfed.svc.cluster.local:8777"


@pytest.mark.parametrize("value, parsed", [
    (TARGET, ("jetfed-workers.jetfed.svc.cluster.local", 8777)),
    ("10.0.0.7:1", ("10.0.0.7", 1)),
    ("[fd00::1]:8777", ("fd00::1", 8777)),
])
def test_a_target_is_host_and_port(value: str, parsed: Address) -> None:
    assert parse_target(value) == parsed


@pytest.mark.parametrize("value", ["jetfed-workers", "host:", ":8777", "host:0", "host:65536", "host:87a7", "[]:1"])
def test_a_bad_target_names_the_setting_and_an_example(value: str) -> None:
    with pytest.raises(InvalidConfig, match=r"workers_dns: .* is not HOST:PORT .*e\.g\. jetfed-workers\."):
        parse_target(value)


def test_an_ipv6_address_is_dialled_in_brackets() -> None:
    assert dial(("fd00::1", 8777)) == "[fd00::1]:8777"
    assert dial(("10.0.0.7", 8777)) == "10.0.0.7:8777"


def test_the_system_resolver_takes_one_family() -> None:
    """localhost has an A and often an AAAA record: one worker, so IPv4 only."""
    assert asyncio.run(resolve_tcp("localhost", 8777)) == [("127.0.0.1", 8777)]


def test_new_workers_are_named_by_their_answers() -> None:
    joins = assign({"10.0.0.2:8777": "bob", "10.0.0.3:8777": "carol"}, {"alice": "10.0.0.1:8777"}, set(),
                   {"10.0.0.1:8777", "10.0.0.2:8777", "10.0.0.3:8777"})
    assert joins.workers == {"bob": "10.0.0.2:8777", "carol": "10.0.0.3:8777"} and not joins.refused


def test_two_new_addresses_with_one_name_are_both_refused_naming_both() -> None:
    joins = assign({"10.0.0.2:8777": "bob", "10.0.0.3:8777": "bob", "10.0.0.4:8777": "dave"}, {}, set(),
                   {"10.0.0.2:8777", "10.0.0.3:8777", "10.0.0.4:8777"})
    assert joins.workers == {"dave": "10.0.0.4:8777"}
    assert set(joins.refused) == {"10.0.0.2:8777", "10.0.0.3:8777"}
    assert joins.refused["10.0.0.3:8777"] == ("workers at 10.0.0.2:8777 and 10.0.0.3:8777 both call themselves "
                                              "'bob'; give each board its own --name")


def test_a_newcomer_taking_a_live_workers_name_is_refused() -> None:
    joins = assign({"10.0.0.9:8777": "alice"}, {"alice": "10.0.0.1:8777"}, set(), {"10.0.0.1:8777", "10.0.0.9:8777"})
    assert joins.workers == {}
    assert joins.refused == {"10.0.0.9:8777": "'alice' is already the worker at 10.0.0.1:8777, and 10.0.0.9:8777 "
                                              "calls itself 'alice' too; give each board its own --name"}


def test_a_worker_whose_old_address_is_gone_moved() -> None:
    """A replaced pod comes back at a new address under the same name."""
    joins = assign({"10.0.0.9:8777": "alice"}, {"alice": "10.0.0.1:8777"}, set(), {"10.0.0.9:8777"})
    assert joins.workers == {"alice": "10.0.0.9:8777"} and not joins.refused


def test_a_name_given_by_worker_flag_is_never_taken_over() -> None:
    joins = assign({"10.0.0.9:8777": "alice"}, {"alice": "192.168.1.5:8777"}, {"alice"}, {"10.0.0.9:8777"})
    assert list(joins.refused) == ["10.0.0.9:8777"] and not joins.workers


class Dns:
    """A resolver stub: each call returns the next answer (an exception is raised)."""

    def __init__(self, *answers: object) -> None:
        self.answers = list(answers)
        self.calls = 0

    async def __call__(self, host: str, port: int) -> List[Address]:
        answer = self.answers[min(self.calls, len(self.answers) - 1)]
        self.calls += 1
        if isinstance(answer, BaseException):
            raise answer
        return [(ip, port) for ip in answer]  # type: ignore[union-attr]


def names(table: Dict[str, object]):
    """A probe stub: the name each address reports (an exception is raised)."""

    async def probe(address: str) -> str:
        answer = table[address]
        if isinstance(answer, BaseException):
            raise answer
        return str(answer)

    return probe


def test_a_failed_lookup_keeps_the_roster_and_logs_one_line_per_outage(caplog: pytest.LogCaptureFixture) -> None:
    dns = WorkerDns("w:1", names({"10.0.0.1:1": "a", "10.0.0.2:1": "b"}),
                    Dns(["10.0.0.1"], OSError("Temporary failure in name resolution"), OSError("again"),
                        ["10.0.0.1", "10.0.0.2"]))

    async def scenario() -> List[Dict[str, str]]:
        known = await dns.first({}, 1, 5.0)
        seen = [dict(known)]
        for _ in range(3):
            known.update((await dns.look(known)).workers)
            seen.append(dict(known))
        return seen

    with caplog.at_level(logging.INFO, logger="coordinator.discovery"):
        seen = asyncio.run(scenario())
    assert seen == [{"a": "10.0.0.1:1"}] * 3 + [{"a": "10.0.0.1:1", "b": "10.0.0.2:1"}]
    failures = [r.getMessage() for r in caplog.records if "lookup failed" in r.getMessage()]
    assert failures == ["workers_dns=w:1 lookup failed (Temporary failure in name resolution); the workers known so "
                        "far go on"]


def test_a_hanging_lookup_costs_a_round_only_its_timeout() -> None:
    async def never(host: str, port: int) -> List[Address]:
        await asyncio.sleep(3600)
        return []

    dns = WorkerDns("w:1", names({}), never, lookup_timeout=0.2)
    started = time.monotonic()
    assert asyncio.run(dns.look({"a": "10.0.0.1:1"})).workers == {}
    assert time.monotonic() - started < 2.0


def test_an_address_that_does_not_answer_yet_is_asked_again_and_a_non_worker_never() -> None:
    probed: List[str] = []
    table = {"10.0.0.1:1": "a", "10.0.0.2:1": Failure(Kind.UNREACHABLE, "UNAVAILABLE", "connection refused"),
             "10.0.0.3:1": NotAWorker("it is a evaluator, not a worker")}
    probe = names(table)

    async def counting(address: str) -> str:
        probed.append(address)
        return await probe(address)

    dns = WorkerDns("w:1", counting, Dns(["10.0.0.1", "10.0.0.2", "10.0.0.3"]))

    async def scenario() -> Dict[str, str]:
        known = await dns.first({}, 1, 5.0)
        table["10.0.0.2:1"] = "b"
        known.update((await dns.look(known)).workers)
        return known

    assert asyncio.run(scenario()) == {"a": "10.0.0.1:1", "b": "10.0.0.2:1"}
    assert sorted(probed) == ["10.0.0.1:1", "10.0.0.2:1", "10.0.0.2:1", "10.0.0.3:1"]


def test_two_workers_with_one_name_at_the_start_end_it_naming_both() -> None:
    dns = WorkerDns("w:1", names({"10.0.0.1:1": "a", "10.0.0.2:1": "a"}), Dns(["10.0.0.1", "10.0.0.2"]))
    with pytest.raises(InvalidConfig, match=r"workers_dns: workers at 10\.0\.0\.1:1 and 10\.0\.0\.2:1 both call "
                                            r"themselves 'a'"):
        asyncio.run(dns.first({}, 1, 5.0))


def test_the_start_waits_for_enough_workers_then_fails_naming_the_target() -> None:
    resolver = Dns([], ["10.0.0.1"], ["10.0.0.1", "10.0.0.2"])
    dns = WorkerDns("w:1", names({"10.0.0.1:1": "a", "10.0.0.2:1": "b"}), resolver)
    assert asyncio.run(dns.first({}, 2, 10.0)) == {"a": "10.0.0.1:1", "b": "10.0.0.2:1"}
    assert resolver.calls == 3
    empty = WorkerDns("w:1", names({}), Dns(OSError("Name or service not known")))
    with pytest.raises(InvalidConfig, match=r"workers_dns: w:1 named no worker within 0\.5s \(the lookup failed: "
                                            r"Name or service not known\); a headless Service lists only ready pods"):
        asyncio.run(empty.first({}, 1, 0.5))


def test_workers_dns_from_the_config_file_and_the_flag(tmp_path: Path) -> None:
    config = tmp_path / "federation.toml"
    config.write_text(f'[federation]\nworkers_dns = "{TARGET}"\nrounds = 3\n')
    assert load_config(config)["workers_dns"] == TARGET
    settings = settings_from(parse_args(["--config", str(config), "--min-workers", "2"]))
    assert (settings.workers, settings.workers_dns, settings.quorum) == ({}, TARGET, 2)
    flag = settings_from(parse_args(["--workers-dns", "w.example:9000", "--worker", "x=10.0.0.1:1"]))
    assert (flag.workers, flag.workers_dns) == ({"x": "10.0.0.1:1"}, "w.example:9000")


@pytest.mark.parametrize("argv, says", [
    (["--workers-dns", "jetfed-workers"], "workers_dns: 'jetfed-workers' is not HOST:PORT"),
    (["--workers-dns", TARGET, "--min-workers", "all"], "min_workers: 'all' needs a fixed list of workers"),
    ([], "--worker NAME=HOST:PORT, or --workers-dns HOST:PORT"),
])
def test_workers_dns_mistakes_are_named(argv: List[str], says: str) -> None:
    with pytest.raises(InvalidConfig, match=says.replace("(", r"\(").replace(")", r"\)")):
        settings_from(parse_args(argv))


def test_a_wrong_type_in_the_file_names_the_key(tmp_path: Path) -> None:
    config = tmp_path / "federation.toml"
    config.write_text("[federation]\nworkers_dns = 8777\n")
    with pytest.raises(InvalidConfig, match=r"\[federation\] workers_dns = 8777 must be a string"):
        load_config(config)
