"""Who to ask each round: a worker that failed is retried with exponential backoff
(in wall time, so a board that reboots is not hammered), and is asked again as soon as
the backoff expires; one good answer clears its record."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional


@dataclass
class WorkerRecord:
    failures: int = 0
    retry_at: float = 0.0
    last_error: Optional[str] = None
    last_round: Optional[int] = None


class Roster:
    def __init__(
        self, names: Iterable[str], base_backoff: float = 0.5, max_backoff: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._records: Dict[str, WorkerRecord] = {name: WorkerRecord() for name in names}
        self._base = base_backoff
        self._max = max_backoff
        self._clock = clock

    @property
    def names(self) -> List[str]:
        return list(self._records)

    def add(self, name: str) -> None:
        """A worker that joined during the run (or came back at a new address): a fresh
        record, asked at once."""
        self._records[name] = WorkerRecord()

    def due(self, everyone: bool = False) -> List[str]:
        """Workers to ask now, in roster order; `everyone` ignores backoff (a retried
        round needs every chance at its quorum)."""
        now = self._clock()
        return [name for name, rec in self._records.items() if everyone or rec.retry_at <= now]

    def succeeded(self, name: str, round_number: int) -> None:
        record = self._records[name]
        record.failures, record.retry_at, record.last_error = 0, 0.0, None
        record.last_round = round_number

    def failed(self, name: str, error: str) -> float:
        """Record a failure; returns the backoff in seconds before the worker is asked again."""
        record = self._records[name]
        record.failures += 1
        record.last_error = error
        delay = min(self._base * 2 ** (record.failures - 1), self._max)
        record.retry_at = self._clock() + delay
        return delay

    def record(self, name: str) -> WorkerRecord:
        return self._records[name]
