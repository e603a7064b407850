"""Signals as cancellation: SIGINT or SIGTERM cancels the running work, so its cleanup
(finally blocks, graceful stops) runs instead of the process dying mid-write."""

from __future__ import annotations

import asyncio
import signal
from typing import Awaitable, TypeVar

T = TypeVar("T")


async def cancel_on_signals(work: Awaitable[T]) -> T:
    """Await `work`; a SIGINT or SIGTERM cancels it and raises CancelledError here."""
    task = asyncio.ensure_future(work)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, task.cancel)
    return await task
