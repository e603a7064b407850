"""Live progress in the coordinator's terminal: round k/N, each worker's state, elapsed
time and ETA, redrawn on every change of the run board. Off a terminal (systemd, CI)
nothing is drawn; the round lines and the log say the same in plain text."""

from __future__ import annotations

import asyncio
import logging
import sys
from typing import Any, List, Optional, Tuple

from coordinator.board import CONNECTING, DONE, FAILED, IDLE, STARTING, TRAINING, RunBoard
from coordinator.report import describe_metrics

_STYLES = {CONNECTING: "yellow", TRAINING: "yellow", DONE: "green", FAILED: "red"}


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}:{secs:02d}"


def _title(board: RunBoard) -> str:
    if board.state == STARTING:
        answered = sum(view.state == IDLE for view in board.workers.values())
        return f"connecting: {answered}/{len(board.workers)} workers answered   elapsed {_clock(board.elapsed)}"
    eta = _clock(board.eta) if board.round_durations else "-"
    return f"round {board.round}/{board.rounds}   elapsed {_clock(board.elapsed)}   ETA {eta}"


def render(board: RunBoard) -> Any:
    from rich.table import Table

    table = Table(title=_title(board), title_justify="left", expand=False)
    # DP-SGD runs: each worker's cumulative epsilon, once a round has reported one.
    private = any(view.epsilon for view in board.workers.values())
    for column in ("worker", "state", "last round", "train s", "loss", *(["epsilon"] if private else []), "error"):
        table.add_column(column)
    for view in board.workers.values():
        style = _STYLES.get(view.state, "")
        spent = [f"{view.epsilon:.3f}" if view.epsilon else "-"] if private else []
        table.add_row(
            view.name, f"[{style}]{view.state}[/]" if style else view.state, str(view.last_contribution or "-"),
            f"{view.last_train_seconds:.2f}", f"{view.last_train_loss:.3f}", *spent, view.last_error[:60],
        )
    if board.last_evaluation:
        best = next((s for s in board.last_evaluation if s.model == "global"), None)
        if best is not None:
            shown = f"{100 * best.accuracy:.2f}%" if best.total else describe_metrics(best.metrics)
            table.caption = f"round {board.last_evaluated_round}: federated model {shown}"
    return table


def _route_logs(stream: Any) -> List[Tuple[logging.StreamHandler, Any]]:
    """Point the root logger's stream handlers at `stream` (rich's stderr proxy while the
    panel is live, so log lines print above it instead of tearing it); returns the
    previous streams. The handlers captured the real stderr when logging was set up."""
    previous = []
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            previous.append((handler, handler.setStream(stream)))
    return previous


class Progress:
    """Owns the terminal while a run goes: lines passed to `say` print above the panel."""

    def __init__(self, board: RunBoard) -> None:
        from rich.console import Console
        from rich.live import Live

        self._board = board
        self._console = Console()
        self._live = Live(render(board), console=self._console, refresh_per_second=4, transient=True)
        self._task: Optional[asyncio.Future] = None
        self._log_streams: List[Tuple[logging.StreamHandler, Any]] = []

    def say(self, line: str) -> None:
        self._console.print(line, highlight=False, markup=False)

    async def __aenter__(self) -> "Progress":
        self._live.start()
        self._log_streams = _route_logs(sys.stderr)
        self._task = asyncio.ensure_future(self._follow())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
        for handler, stream in self._log_streams:
            handler.setStream(stream)
        self._live.stop()

    async def _follow(self) -> None:
        seen = -1
        while True:
            self._live.update(render(self._board))
            try:
                seen = await asyncio.wait_for(self._board.wait_change(seen), 1.0)
            except asyncio.TimeoutError:
                pass  # redraw anyway: elapsed time moves on
