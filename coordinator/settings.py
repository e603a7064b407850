"""Everything a run needs, validated once at start-up with errors that name the field."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional

from jetfed import stream
from jetfed.config import TrainConfig
from jetfed.errors import InvalidConfig
from jetfed.models import DEFAULT_MODEL, build_model
from jetfed.tls import TlsFiles

WEIGHTINGS = ("examples", "equal")


@dataclass(frozen=True)
class RunSettings:
    workers: Dict[str, str]
    evaluator: Optional[str]
    out_dir: Path
    rounds: int = 40
    eval_every: int = 10
    model: str = DEFAULT_MODEL
    train: TrainConfig = field(default_factory=TrainConfig)
    lr_decay: float = 0.98
    lr_min_factor: float = 0.01
    weighting: str = "examples"
    chunk_bytes: int = stream.DEFAULT_CHUNK_BYTES
    max_payload_bytes: int = stream.DEFAULT_MAX_PAYLOAD_BYTES
    round_timeout: float = 300.0
    eval_timeout: float = 300.0
    connect_timeout: float = 60.0
    min_workers: Optional[int] = None
    round_retries: int = 3
    max_backoff: float = 30.0
    resume: bool = False
    status_address: Optional[str] = None
    metrics_address: Optional[str] = None
    # Mutual TLS towards the fleet (the coordinator's certificate), or None: plaintext.
    tls: Optional[TlsFiles] = None
    # The shared bearer token for services without TLS; kept out of repr and logs.
    token: Optional[str] = field(default=None, repr=False)

    @property
    def quorum(self) -> int:
        """Updates a round needs; by default a majority of the workers."""
        return self.min_workers if self.min_workers is not None else len(self.workers) // 2 + 1

    def validated(self) -> "RunSettings":
        if not self.workers:
            raise InvalidConfig("workers: at least one worker is needed (--worker NAME=HOST:PORT)")
        if self.rounds < 1:
            raise InvalidConfig(f"rounds: {self.rounds} must be at least 1")
        if self.eval_every < 1:
            raise InvalidConfig(f"eval_every: {self.eval_every} must be at least 1")
        if not (math.isfinite(self.lr_decay) and 0 < self.lr_decay <= 1):
            raise InvalidConfig(f"lr_decay: {self.lr_decay} must be in (0, 1]")
        if not (math.isfinite(self.lr_min_factor) and 0 <= self.lr_min_factor <= 1):
            raise InvalidConfig(f"lr_min_factor: {self.lr_min_factor} must be in [0, 1]")
        if self.weighting not in WEIGHTINGS:
            raise InvalidConfig(f"weighting: {self.weighting!r} is not one of {', '.join(WEIGHTINGS)}")
        if not 1 <= self.quorum <= len(self.workers):
            raise InvalidConfig(f"min_workers: {self.quorum} must be in 1..{len(self.workers)} (the workers given)")
        if self.round_retries < 0:
            raise InvalidConfig(f"round_retries: {self.round_retries} must be 0 or more")
        for name, value in (
            ("round_timeout", self.round_timeout), ("eval_timeout", self.eval_timeout),
            ("connect_timeout", self.connect_timeout), ("max_backoff", self.max_backoff),
        ):
            if not (math.isfinite(value) and value > 0):
                raise InvalidConfig(f"{name}: {value} must be a positive number of seconds")
        for name, address in (("status_address", self.status_address), ("metrics_address", self.metrics_address)):
            if address is not None and not address.rpartition(":")[2].isdigit():
                raise InvalidConfig(f"{name}: {address!r} is not HOST:PORT")
        stream.check_chunk_size(self.chunk_bytes)
        build_model(self.model)
        self.train.validated()
        return self

    def lr_for(self, round_number: int) -> float:
        """The reference's schedule: lr shrinks by `lr_decay` each round, floored at
        `lr_min_factor` times the starting lr."""
        base = self.train.lr
        return max(base * self.lr_decay ** (round_number - 1), base * self.lr_min_factor)

    def evaluates(self, round_number: int) -> bool:
        """Rounds 1, 1+k, 1+2k, ... and the last, as in the reference (k = 10)."""
        return (round_number - 1) % self.eval_every == 0 or round_number == self.rounds
