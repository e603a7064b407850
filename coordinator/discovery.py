"""Workers named by DNS (`--workers-dns HOST:PORT`): every address HOST resolves to is
a worker on PORT, named by its own GetInfo answer. Kubernetes' headless Service gives
one A record per ready worker pod, so a board that joins the DaemonSet joins the run:
the runner looks again between rounds. DNS is asked through one seam, `Resolve`, so a
test can stand a stub there and keep the workers real."""

from __future__ import annotations

import asyncio
import logging
import socket
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Dict, List, Optional, Set, Tuple

from coordinator.clients import WorkerClient
from coordinator.failures import describe_failure
from jetfed.auth import bearer_metadata
from jetfed.errors import InvalidConfig, JetfedError

log = logging.getLogger(__name__)

SETTING = "workers_dns"
# (host, port): what an A or AAAA record names, on the configured port.
Address = Tuple[str, int]
Resolve = Callable[[str, int], Awaitable[List[Address]]]
# An address to the name its GetInfo reports (JetfedError when it does not answer).
Probe = Callable[[str], Awaitable[str]]

# A round never waits on DNS longer than this; a lookup that takes longer is a failure.
LOOKUP_TIMEOUT_S = 2.0
# A newly resolved address has this long to say its name; it is asked again next time.
PROBE_TIMEOUT_S = 5.0
# How often the start looks again while DNS names fewer workers than it needs.
_START_POLL_S = 1.0


def parse_target(value: str) -> Address:
    """HOST:PORT (an IPv6 literal in brackets), or InvalidConfig naming the setting."""
    host, sep, port = value.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535 or not host.isprintable():
        raise InvalidConfig(f"{SETTING}: {value!r} is not HOST:PORT with a port in 1..65535, e.g. "
                            "jetfed-workers.jetfed.svc.cluster.local:8777 (--workers-dns)")
    return host, int(port)


def dial(address: Address) -> str:
    """The HOST:PORT a gRPC channel takes (an IPv6 address in brackets)."""
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def resolve_tcp(host: str, port: int) -> List[Address]:
    """Every address of `host` (the system resolver: /etc/hosts, then DNS), in one family:
    IPv4 when there is any, else IPv6, since a dual-stack pod has a record of each and
    must be one worker, not two."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    found: Dict[int, Set[Address]] = {}
    for family, _, _, _, sockaddr in infos:
        found.setdefault(family, set()).add((str(sockaddr[0]), port))
    chosen = found.get(socket.AF_INET) or found.get(socket.AF_INET6) or set()
    return sorted(chosen)


def grpc_probe(chunk_bytes: int, credentials: object, token: Optional[str], timeout: float = PROBE_TIMEOUT_S) -> Probe:
    """A Probe that asks GetInfo over a channel of its own, with the run's credentials."""

    async def probe(address: str) -> str:
        client = WorkerClient(address, address, chunk_bytes, credentials=credentials,
                              metadata=bearer_metadata(token))
        try:
            info = await client.info(timeout=timeout)
        finally:
            await client.close()
        if info.role and info.role != "worker":
            raise NotAWorker(f"it is a {info.role}, not a worker")
        if not info.name.strip() or not info.name.isprintable():
            raise NotAWorker(f"it reports no usable name ({info.name!r}); give it --name")
        return info.name

    return probe


class NotAWorker(InvalidConfig):
    """An address that answered, but not as a worker of this run can be named: refused,
    not asked again."""


@dataclass
class Joins:
    """What one look at DNS found: workers to (re)join by name, and refusals by address."""

    workers: Dict[str, str] = field(default_factory=dict)
    refused: Dict[str, str] = field(default_factory=dict)


def assign(answers: Dict[str, str], known: Dict[str, str], fixed: Set[str], resolved: Set[str]) -> Joins:
    """Name the newly found `answers` (address -> the name it reports) against the
    workers `known` (name -> address). A name is one worker: two new addresses with the
    same name are both refused, and so is a new one taking the name of a worker still
    resolved or given by --worker (`fixed`); a DNS worker whose old address is gone
    from `resolved` moved (its pod was replaced) and joins at the new one."""
    joins = Joins()
    by_name: Dict[str, List[str]] = {}
    for address, name in sorted(answers.items()):
        by_name.setdefault(name, []).append(address)
    for name, addresses in by_name.items():
        if len(addresses) > 1:
            for address in addresses:
                joins.refused[address] = (f"workers at {' and '.join(addresses)} both call themselves {name!r}; "
                                          "give each board its own --name")
            continue
        address, old = addresses[0], known.get(name)
        if old is not None and (name in fixed or old in resolved):
            joins.refused[address] = (f"{name!r} is already the worker at {old}, and {address} calls itself "
                                      f"{name!r} too; give each board its own --name")
            continue
        joins.workers[name] = address
    return joins


class WorkerDns:
    """The workers behind one DNS name. Each look is bounded: the lookup by
    `lookup_timeout`, each new address's GetInfo by the probe's own timeout, all at
    once; only addresses not seen before are probed, and a refused one is not probed
    again (its refusal is logged once)."""

    def __init__(self, target: str, probe: Probe, resolve: Resolve = resolve_tcp,
                 lookup_timeout: float = LOOKUP_TIMEOUT_S) -> None:
        self.target = target
        self._host, self._port = parse_target(target)
        self._probe = probe
        self._resolve = resolve
        self._lookup_timeout = lookup_timeout
        self._refused: Dict[str, str] = {}
        self._last_error: Optional[str] = None
        # Names given by --worker: never taken over by an address DNS names.
        self._fixed: Set[str] = set()

    async def lookup(self) -> Optional[List[str]]:
        """The addresses DNS names now, or None when the lookup fails or takes longer
        than its timeout (one log line; the caller keeps the workers it knows)."""
        try:
            found = await asyncio.wait_for(self._resolve(self._host, self._port), self._lookup_timeout)
        except asyncio.TimeoutError:
            error = f"no answer within {self._lookup_timeout:g}s"
        except (OSError, UnicodeError) as exc:
            error = str(exc) or type(exc).__name__
        else:
            if self._last_error is not None:
                log.info("%s=%s lookups answer again", SETTING, self.target)
            self._last_error = None
            return sorted({dial(address) for address in found})
        if self._last_error is None:  # one line per outage, not one per round
            log.warning("%s=%s lookup failed (%s); the workers known so far go on", SETTING, self.target, error)
        self._last_error = error
        return None

    async def look(self, known: Dict[str, str]) -> Joins:
        """Resolve, probe the new addresses, and name them against the workers `known`
        (name -> address)."""
        resolved = await self.lookup()
        if resolved is None:
            return Joins()
        seen = set(known.values()) | set(self._refused)
        new = [address for address in resolved if address not in seen]
        results = await asyncio.gather(*(self._probe(address) for address in new), return_exceptions=True)
        answers: Dict[str, str] = {}
        for address, result in zip(new, results):
            if isinstance(result, str):
                answers[address] = result
            elif isinstance(result, NotAWorker):
                self._refused[address] = str(result)
                log.warning("%s=%s address=%s refused: %s", SETTING, self.target, address, result)
            elif isinstance(result, JetfedError):
                log.info("%s=%s address=%s not joined yet: %s", SETTING, self.target, address, describe_failure(result))
            else:
                raise result
        joins = assign(answers, known, self._fixed, set(resolved))
        for address, reason in joins.refused.items():
            log.warning("%s=%s address=%s refused: %s", SETTING, self.target, address, reason)
        self._refused.update(joins.refused)
        return joins

    async def first(self, fixed: Dict[str, str], needed: int, timeout: float) -> Dict[str, str]:
        """The workers at the start, beside the `fixed` ones: looks every second until
        they number `needed` or `timeout` passes; none at all ends the start. Two that share a name end the start,
        naming both addresses (InvalidConfig): which of them is the worker is unknowable."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        workers = dict(fixed)
        self._fixed = set(fixed)
        while True:
            joins = await self.look(workers)
            if joins.refused:
                raise InvalidConfig(f"{SETTING}: {next(iter(joins.refused.values()))}")
            workers.update(joins.workers)
            if len(workers) >= needed or loop.time() >= deadline:
                break
            await asyncio.sleep(min(_START_POLL_S, max(deadline - loop.time(), 0.0)))
        if not workers:
            why = f"the lookup failed: {self._last_error}" if self._last_error else "no address answered as a worker"
            raise InvalidConfig(
                f"{SETTING}: {self.target} named no worker within {timeout:g}s ({why}); a headless Service lists "
                "only ready pods: `kubectl -n jetfed get pods,endpoints` shows them")
        return workers
