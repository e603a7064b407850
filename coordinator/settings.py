"""Everything a run needs, validated once at start-up with errors that name the field."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional

import grpc

from coordinator.discovery import parse_target
from coordinator.strategies.registry import StrategySpec
from jetfed import stream
from jetfed.compression import Encoding
from jetfed.config import TrainConfig
from jetfed.errors import InvalidConfig
from jetfed.tls import TlsFiles

# The boards' default task (jetfed.tasks.DEFAULT_TASK), named here because the
# coordinator imports no task code.
DEFAULT_TASK = "mnist"
# Task and model names travel in GetInfo and every manifest; longer is a mistake.
MAX_NAME_CHARS = 200

WEIGHTINGS = ("examples", "equal")
# Rounds travel as uint32 (TrainHeader.round, RunStatus.round and .rounds).
MAX_ROUNDS = 2**32 - 1
# No call or wait lasts longer than a week: beyond it a value is a typo, and gRPC and
# asyncio deadlines overflow long before float does.
MAX_SECONDS = 7 * 24 * 3600.0
MAX_ROUND_RETRIES = 1000
# The largest update a coordinator buffers per worker; each is held in memory whole.
MAX_PAYLOAD_BYTES = 4 << 30
# An update whose delta norm exceeds this multiple of the round's median is scaled down to the median.
DEFAULT_MAX_NORM_RATIO = 10.0
MAX_NORM_RATIO = 1e6
# --max-concurrency: beyond this many calls in flight a value is a typo (0: no bound).
MAX_CONCURRENCY = 1_000_000


@dataclass(frozen=True)
class RunSettings:
    workers: Dict[str, str]
    evaluator: Optional[str]
    out_dir: Path
    # HOST:PORT whose every address is a worker, named by its GetInfo (coordinator.discovery),
    # beside `workers`; looked up again between rounds.
    workers_dns: Optional[str] = None
    rounds: int = 40
    eval_every: int = 10
    # The task the fleet must run, by the name its GetInfo reports; never imported here.
    task: str = DEFAULT_TASK
    # The model the fleet must serve; None: whatever it serves, the same on every board.
    model: Optional[str] = None
    # The run's first weights (a safetensors state_dict); None: a worker's, for the seed.
    init_weights: Optional[Path] = None
    train: TrainConfig = field(default_factory=TrainConfig)
    lr_decay: float = 0.98
    lr_min_factor: float = 0.01
    weighting: str = "examples"
    # How updates become the next global model (coordinator.strategies).
    strategy: StrategySpec = field(default_factory=StrategySpec)
    max_norm_ratio: float = DEFAULT_MAX_NORM_RATIO
    chunk_bytes: int = stream.DEFAULT_CHUNK_BYTES
    # Largest update accepted from a worker; None: the model's size plus a margin.
    max_payload_bytes: Optional[int] = None
    round_timeout: float = 300.0
    eval_timeout: float = 300.0
    connect_timeout: float = 60.0
    min_workers: Optional[int] = None
    round_retries: int = 3
    max_backoff: float = 30.0
    # Train calls in flight at once in a round (0: every worker asked at once). A round
    # asking more workers than this folds each update into the step as it arrives
    # (federation.Federation._attempt), so the coordinator holds O(bound) updates.
    max_concurrency: int = 0
    # How the global model goes to a worker that holds an earlier one: "raw" (whole,
    # today's), or fp16, bf16, int8, int8-channel, topk:<fraction> as a delta from the
    # model that worker got in its last successful round (jetfed.compression). How the
    # workers answer is train.uplink_encoding.
    downlink_encoding: str = "raw"
    resume: bool = False
    # Score every update on the evaluator, as the reference did (simulations of many
    # workers score only the global model).
    score_updates: bool = True
    status_address: Optional[str] = None
    metrics_address: Optional[str] = None
    # Mutual TLS towards the fleet (the coordinator's certificate), or None: plaintext.
    tls: Optional[TlsFiles] = None
    # Secure aggregation (coordinator.secure_rounds): the coordinator learns only the sum
    # of the updates. The threshold t of workers whose shares rebuild a secret (0: a
    # majority of the workers), the fixed-point clip of every update coordinate, and the
    # most workers a round's sum must hold (0: the workers given).
    secure_aggregation: bool = False
    secagg_threshold: int = 0
    secagg_clip: float = 1.0
    secagg_max_workers: int = 0
    # The shared bearer token for services without TLS; kept out of repr and logs.
    token: Optional[str] = field(default=None, repr=False)

    @property
    def per_round(self) -> int:
        """Workers asked each round: all, or the strategy's sample."""
        sample = int(self.strategy.resolved().get("sample", 0))
        return sample if 0 < sample < len(self.workers) else len(self.workers)

    @property
    def quorum(self) -> int:
        """Updates a round needs; by default a majority of the workers asked."""
        return self.min_workers if self.min_workers is not None else self.per_round // 2 + 1

    def channel_credentials(self) -> Optional[grpc.ChannelCredentials]:
        """What the coordinator's calls to the fleet (and DNS discovery's probes) use."""
        return self.tls.channel_credentials() if self.tls else None

    def validated(self) -> "RunSettings":
        """Every field against what it must mean and what the wire and the status
        contract can carry, so a value is refused at start, never wrapped or garbled."""
        if not self.workers and self.workers_dns is None:
            raise InvalidConfig("workers: at least one worker is needed (--worker NAME=HOST:PORT, "
                                "or --workers-dns HOST:PORT)")
        if self.workers_dns is not None:
            parse_target(self.workers_dns)
        _check_int("rounds", self.rounds, 1, MAX_ROUNDS)
        _check_int("eval_every", self.eval_every, 1, MAX_ROUNDS)
        if not (math.isfinite(self.lr_decay) and 0 < self.lr_decay <= 1):
            raise InvalidConfig(f"lr_decay: {self.lr_decay} must be in (0, 1]")
        if not (math.isfinite(self.lr_min_factor) and 0 <= self.lr_min_factor <= 1):
            raise InvalidConfig(f"lr_min_factor: {self.lr_min_factor} must be in [0, 1]")
        if self.weighting not in WEIGHTINGS:
            raise InvalidConfig(f"weighting: {self.weighting!r} is not one of {', '.join(WEIGHTINGS)}")
        if not (math.isfinite(self.max_norm_ratio) and 1 < self.max_norm_ratio <= MAX_NORM_RATIO):
            raise InvalidConfig(f"max_norm_ratio: {self.max_norm_ratio} must be a number in (1, {MAX_NORM_RATIO:g}]")
        strategy = self.strategy.build(weighting=self.weighting, seed=self.train.seed)
        if self.secure_aggregation:  # before the strategy's own checks: this is the news
            self._check_secure_aggregation()
        # Workers named by DNS only: checked again once the start has named them.
        if self.workers and not 1 <= self.quorum <= self.per_round:
            asked = "the workers given" if self.per_round == len(self.workers) else "the strategy's sample"
            raise InvalidConfig(f"min_workers: {self.quorum} must be in 1..{self.per_round} ({asked})")
        needed = strategy.workers_needed()
        if self.workers and self.quorum < needed:
            f = self.strategy.resolved().get("f", 0)
            raise InvalidConfig(
                f"strategy {self.strategy.name} withstands f={f} hostile workers only with {needed} updates or more "
                f"per round, and this run's quorum is {self.quorum}: give --min-workers {needed} (with at least "
                f"{needed} workers) or a smaller f (--strategy-param f=N)")
        _check_int("round_retries", self.round_retries, 0, MAX_ROUND_RETRIES)
        _check_int("max_concurrency", self.max_concurrency, 0, MAX_CONCURRENCY)
        for name, value in (
            ("round_timeout", self.round_timeout), ("eval_timeout", self.eval_timeout),
            ("connect_timeout", self.connect_timeout), ("max_backoff", self.max_backoff),
        ):
            if not (math.isfinite(value) and 0 < value <= MAX_SECONDS):
                raise InvalidConfig(f"{name}: {value} must be a number of seconds in (0, {MAX_SECONDS:.0f}]")
        for name, address in (("status_address", self.status_address), ("metrics_address", self.metrics_address)):
            port = address.rpartition(":")[2] if address is not None else "0"
            if not (port.isdigit() and int(port) <= 65535):
                raise InvalidConfig(f"{name}: {address!r} is not HOST:PORT with a port in 0..65535")
        stream.check_chunk_size(self.chunk_bytes)
        if self.max_payload_bytes is not None:
            _check_int("max_payload_bytes", self.max_payload_bytes, 1, MAX_PAYLOAD_BYTES)
        _check_name("task", self.task, "e.g. --task mnist")
        if self.model is not None:
            _check_name("model", self.model, "or leave --model out to take the fleet's")
        if self.init_weights is not None and not self.init_weights.is_file():
            raise InvalidConfig(f"init_weights: {self.init_weights} is not a file; give a safetensors file "
                                "(--init-weights), or leave it out to start from a worker's weights")
        self.train.validated()
        Encoding.parse(self.downlink_encoding, "downlink_encoding")
        return self

    @property
    def secagg_resolved_threshold(self) -> int:
        """The threshold secure aggregation runs with: the setting, or a majority of the workers."""
        return self.secagg_threshold or len(self.workers) // 2 + 1

    def _check_secure_aggregation(self) -> None:
        """What cannot work when the coordinator sees only the sum: one clear line each."""
        flag = "--secure-aggregation"
        values = self.strategy.resolved()
        if self.strategy.asynchronous:
            raise InvalidConfig(f"{flag}: strategy {self.strategy.name} steps on each update as it arrives, and "
                                "secure aggregation gives the coordinator only a round's sum; use a synchronous "
                                "strategy (fedavg, fedprox, fedavgm, fedadam, fedyogi, fedadagrad)")
        from jetfed.secagg import FixedPoint, SecAggError, check_aggregator
        from coordinator.strategies.registry import PRESETS
        preset = PRESETS.get(self.strategy.name)
        try:
            check_aggregator(str(values.get("aggregator", "mean")),
                             control_variates=bool(preset is not None and preset.control_variates))
        except SecAggError as exc:
            raise InvalidConfig(f"{flag}: strategy {self.strategy.name}: {exc}") from None
        if self.train.uplink_encoding not in ("", "raw"):
            raise InvalidConfig(f"{flag}: a masked update is uniform noise and does not compress; drop "
                                f"--uplink-encoding {self.train.uplink_encoding} (the downlink still compresses)")
        if self.max_concurrency and self.max_concurrency < len(self.workers):
            raise InvalidConfig(f"{flag}: every participant of a secure round masks with every other, so all are "
                                f"asked at once; drop --max-concurrency {self.max_concurrency}")
        if not self.workers:
            raise InvalidConfig(f"{flag}: the workers must be given (--worker), not found by DNS: the "
                                "threshold is fixed for the run")
        n = len(self.workers)
        _check_int("secagg_threshold", self.secagg_threshold, 0, n)
        _check_int("secagg_max_workers", self.secagg_max_workers, 0, MAX_CONCURRENCY)
        t = self.secagg_resolved_threshold
        if n < 3 or not n // 2 + 1 <= t <= n - 1:
            raise InvalidConfig(f"{flag}: secagg_threshold {t} with {n} workers: secure aggregation needs at least "
                                f"3 workers and a threshold in {n // 2 + 1}..{max(n - 1, 1)} (over half of them, and "
                                "one to spare so a dropped worker's masks can be removed)")
        if not (math.isfinite(self.secagg_clip) and self.secagg_clip >= 1):
            raise InvalidConfig(f"secagg_clip: {self.secagg_clip} must be a number >= 1 (each update coordinate "
                                "is clipped to it; the worker's weight, at most 1, travels in the same encoding)")
        try:
            FixedPoint.for_fleet(self.secagg_clip, self.secagg_max_workers or n)
        except SecAggError as exc:
            raise InvalidConfig(f"secagg_clip, secagg_max_workers: {exc}") from None

    def lr_for(self, round_number: float) -> float:
        """The reference's schedule: lr shrinks by `lr_decay` each round, floored at
        `lr_min_factor` times the starting lr."""
        base = self.train.lr
        return max(base * self.lr_decay ** (round_number - 1), base * self.lr_min_factor)

    def evaluates(self, round_number: int) -> bool:
        """Rounds 1, 1+k, 1+2k, ... and the last, as in the reference (k = 10)."""
        return (round_number - 1) % self.eval_every == 0 or round_number == self.rounds


def _check_name(name: str, value: str, hint: str) -> None:
    """A task or model name: what services report in GetInfo, compared as is."""
    if not isinstance(value, str) or not value.strip() or len(value) > MAX_NAME_CHARS or not value.isprintable():
        raise InvalidConfig(f"{name}: {value!r} must be a name of 1..{MAX_NAME_CHARS} printable characters; {hint}")


def _check_int(name: str, value: int, low: int, high: int) -> None:
    """An integer field within `low`..`high`; a TOML float or a bool is refused too."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidConfig(f"{name}: {value!r} must be an integer in {low}..{high}")
