"""What a worker is busy with: the one round it holds (TrainingSlot) and the run it
serves (RunLedger). Both live on the event loop's thread and need no lock."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional

from jetfed.errors import InvalidConfig, RunConflict, WorkerBusy
from jetfed.status import echo

log = logging.getLogger(__name__)

MAX_RUN_ID_CHARS = 128
# However slowly a run goes, another may have the worker this long after its last Train.
MAX_RUN_HOLD_S = 120.0


@dataclass
class Round:
    """One Train's hold on the worker, from its accepted header until its training
    thread is done; `stop` tells that thread nobody awaits the round any more."""

    number: int
    run_id: str
    stop: threading.Event = field(default_factory=threading.Event)
    abandoned_at: Optional[float] = None
    # Set once the call ended before its training: the stopping thread releases the round.
    outlives_call: bool = False

    def abandon(self) -> bool:
        """Tell the training thread to stop; False if it was told already."""
        if self.abandoned_at is not None:
            return False
        self.abandoned_at = time.monotonic()
        self.stop.set()
        return True


class TrainingSlot:
    """At most one round at a time: a second Train is refused (ABORTED, retry later),
    never queued, since a queue would hold its caller's stream and payload."""

    def __init__(self, worker: str) -> None:
        self._worker = worker
        self._held: Optional[Round] = None
        self._waiters: List["asyncio.Future[None]"] = []

    def locked(self) -> bool:
        return self._held is not None

    @property
    def held(self) -> Optional[Round]:
        return self._held

    async def wait_free(self) -> None:
        """Return once no round holds the worker."""
        if self._held is None:
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        await waiter

    def claim(self, number: int, run_id: str) -> Round:
        held = self._held
        if held is not None and held.abandoned_at is not None:
            raise WorkerBusy(f"worker {self._worker} is stopping round {held.number}, abandoned by its caller; "
                             "retry in a moment")
        if held is not None:
            raise WorkerBusy(f"worker {self._worker} is already training round {held.number}; retry when it is done")
        self._held = Round(number, run_id)
        return self._held

    def release(self, held: Round) -> None:
        if self._held is not held:
            return
        self._held = None
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)


class RunLedger:
    """The run this worker serves, so two coordinators driving it at once are told.

    A run counts as going on while a Train of it is in progress and, after one ends,
    while its next is due: within twice the longest interval between two of its Trains
    so far (an evaluation round is slower than a training one; twice its only Train's
    duration before that), at most MAX_RUN_HOLD_S. A Train from
    another run inside that window is refused (FAILED_PRECONDITION naming both runs)
    rather than logged: the second coordinator's run fails with a message that says
    what is wrong, and the first goes on untouched. A run that has really ended
    frees the worker within seconds, so a new run (or a resumed one, which keeps its
    id) is not held up; one its coordinator ends (EndRun) frees it at once. A Train
    without a run id (a coordinator that does not send one) is neither refused nor
    recorded."""

    def __init__(self, worker: str, clock: Callable[[], float] = time.monotonic) -> None:
        self._worker = worker
        self._clock = clock
        self._run = ""
        self._peer = ""
        self._started: Optional[float] = None
        self._ended: Optional[float] = None
        self._interval: Optional[float] = None
        # Its coordinator ended the run while a Train of it was in progress.
        self._ending = False

    def check(self, run_id: str) -> None:
        """Refuse `run_id` while another run goes on; the id must be short."""
        _require_short(run_id)
        if not run_id or not self._run or run_id == self._run:
            return
        if self._ended is None:
            since = "has a Train in progress"
        else:
            idle = self._clock() - self._ended
            if idle >= self._hold():
                return
            since = f"ended its last Train {idle:.1f}s ago and is due again within {self._hold():.1f}s"
        raise RunConflict(
            f"{RunConflict.MARKER} worker {self._worker}: it serves run {echo(self._run)} (from {self._peer}), which "
            f"{since}; this Train is from run {echo(run_id)}; stop one, or retry once the other's run has ended"
        )

    def started(self, run_id: str, peer: str) -> None:
        if not run_id:
            return
        now = self._clock()
        if run_id == self._run and self._started is not None:
            self._interval = max(self._interval or 0.0, now - self._started)
        else:
            log.info("worker=%s serving run=%s peer=%s previous_run=%s", self._worker, echo(run_id), peer,
                     echo(self._run) or "-")
            self._run, self._interval = run_id, None
        self._peer, self._started, self._ended, self._ending = peer, now, None, False

    def ended(self, run_id: str) -> None:
        if not run_id or run_id != self._run:
            return
        self._ended = self._clock()
        if self._ending:
            self._free("its Train in progress at the end of the run has ended")

    def release(self, run_id: str) -> bool:
        """Free the worker of `run_id`, whose coordinator says it has ended, so the next
        run need not wait out the hold; True if this call freed it. Another run's id
        (or one never seen) changes nothing: only the run's own coordinator knows its
        id. With a Train of it still in progress (a call the coordinator has just
        cancelled, whose end the worker has not yet seen) the worker is freed when that
        Train ends, never under it."""
        _require_short(run_id)
        if not run_id or run_id != self._run:
            log.info("worker=%s end of run=%s ignored: serving run=%s", self._worker, echo(run_id) or "-",
                     echo(self._run) or "-")
            return False
        if self._ended is None:
            self._ending = True
            log.info("worker=%s run=%s ends once its Train in progress ends", self._worker, echo(run_id))
            return False
        self._free("its coordinator ended it")
        return True

    def _free(self, why: str) -> None:
        log.info("worker=%s released run=%s: %s", self._worker, echo(self._run), why)
        self._run, self._peer, self._ending = "", "", False
        self._started = self._ended = self._interval = None

    def _hold(self) -> float:
        assert self._started is not None and self._ended is not None
        pace = self._interval if self._interval is not None else self._ended - self._started
        return min(2 * pace, MAX_RUN_HOLD_S)


def _require_short(run_id: str) -> None:
    """A run id is an opaque token, not a payload: refuse one that would bloat logs."""
    if len(run_id) > MAX_RUN_ID_CHARS:
        raise InvalidConfig(f"run_id: {len(run_id)} characters, at most {MAX_RUN_ID_CHARS}")
