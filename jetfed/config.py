"""The training recipe a coordinator sends each round, validated once wherever it is
read, with errors that name the field."""

from __future__ import annotations

import math
from dataclasses import dataclass

from jetfed.errors import InvalidConfig

OPTIMIZERS = ("sgd", "adam")
LOSSES = ("nll",)
MAX_BATCH_SIZE = 65536
MAX_BATCHES = 1_000_000
MAX_EPOCHS = 1000
# FedProx's mu is a weight beside a loss near 1: the paper tries 0.001..1; beyond 1000
# the term would swamp any task loss and the round could only stand still.
MAX_PROXIMAL_MU = 1000.0
# DP-SGD's noise multiplier sigma: 0.5..10 in practice; beyond 1000 no model learns.
MAX_NOISE_MULTIPLIER = 1000.0
# A worker's bound on the examples one Train may ask it to process (epochs x examples
# per epoch): a valid config can still ask for days of work (1000 epochs of batch size
# 1). The reference recipe needs 320; the default allows about 40 passes over a board's
# 24,000-image partition and still ends a hostile round in minutes.
WORK_SETTING = "--max-examples-per-round"
DEFAULT_MAX_EXAMPLES_PER_ROUND = 1_000_000


@dataclass(frozen=True)
class TrainConfig:
    """Defaults are the reference recipe: SGD, lr 0.1, 10 batches of 32, one epoch.

    `proximal_mu` > 0 adds FedProx's proximal term (Li et al. 2020), mu/2 ||w - w0||^2
    from the global model w0 the round started from, to every batch's loss: it keeps a
    board with skewed data near the global model. 0 is plain local training.

    `scaffold` asks for SCAFFOLD's corrected local steps (Karimireddy et al. 2020,
    option II; jetfed.scaffold): the Train weights then carry the server's control
    variate beside the model, and the worker keeps its own between rounds. The
    correction and the control update assume plain SGD steps, so it needs "sgd".

    `noise_multiplier` > 0 asks for record-level DP-SGD (jetfed.privacy): Poisson
    sampling, each example's gradient clipped to `max_grad_norm`, Gaussian noise of
    sigma * max_grad_norm; the worker accounts (epsilon, `dp_delta`) per run and
    refuses a round that would take it over `epsilon_budget` (0: no budget). All four
    at 0 is plain training."""

    optimizer: str = "sgd"
    loss: str = "nll"
    lr: float = 0.1
    momentum: float = 0.0
    batch_size: int = 32
    max_batches: int = 10
    epochs: int = 1
    seed: int = 0
    proximal_mu: float = 0.0
    scaffold: bool = False
    noise_multiplier: float = 0.0
    max_grad_norm: float = 0.0
    dp_delta: float = 0.0
    epsilon_budget: float = 0.0
    # How the worker sends its result (jetfed.compression): "raw" is the full trained
    # weights; fp16, bf16, int8, int8-channel or topk:<fraction> the difference from the
    # weights it was sent, so encoded.
    uplink_encoding: str = "raw"

    @property
    def private(self) -> bool:
        """Whether rounds of this config train with DP-SGD."""
        return self.noise_multiplier > 0

    def validated(self) -> "TrainConfig":
        if self.optimizer not in OPTIMIZERS:
            raise InvalidConfig(f"optimizer: {self.optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
        if self.loss not in LOSSES:
            raise InvalidConfig(f"loss: {self.loss!r} is not one of {', '.join(LOSSES)}")
        if not (math.isfinite(self.lr) and 0 < self.lr <= 100):
            raise InvalidConfig(f"lr: {self.lr} must be a finite number in (0, 100]")
        if not (math.isfinite(self.momentum) and 0 <= self.momentum < 1):
            raise InvalidConfig(f"momentum: {self.momentum} must be in [0, 1)")
        if not 1 <= self.batch_size <= MAX_BATCH_SIZE:
            raise InvalidConfig(f"batch_size: {self.batch_size} must be in 1..{MAX_BATCH_SIZE}")
        if not 0 <= self.max_batches <= MAX_BATCHES:
            raise InvalidConfig(f"max_batches: {self.max_batches} must be in 0..{MAX_BATCHES} (0 = all)")
        if not 1 <= self.epochs <= MAX_EPOCHS:
            raise InvalidConfig(f"epochs: {self.epochs} must be in 1..{MAX_EPOCHS}")
        if not 0 <= self.seed < 2**63:
            raise InvalidConfig(f"seed: {self.seed} must be in 0..2**63-1")
        if not (math.isfinite(self.proximal_mu) and 0 <= self.proximal_mu <= MAX_PROXIMAL_MU):
            raise InvalidConfig(
                f"proximal_mu: {self.proximal_mu} must be a finite number in [0, {MAX_PROXIMAL_MU:g}] (0 = no proximal term)"
            )
        if self.scaffold and self.optimizer != "sgd":
            raise InvalidConfig(
                f"scaffold: needs optimizer 'sgd', not {self.optimizer!r}: SCAFFOLD's correction and control "
                "update assume plain SGD steps; set optimizer = \"sgd\" or scaffold = false"
            )
        self._check_privacy()
        from jetfed.compression import Encoding  # here: torch-free readers of this module need not load it

        Encoding.parse(self.uplink_encoding)
        return self

    def _check_privacy(self) -> None:
        for name in ("noise_multiplier", "max_grad_norm", "dp_delta", "epsilon_budget"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise InvalidConfig(f"{name}: {value} must be a finite number >= 0 (0 = no differential privacy)")
        if self.noise_multiplier > MAX_NOISE_MULTIPLIER:
            raise InvalidConfig(f"noise_multiplier: {self.noise_multiplier} must be at most {MAX_NOISE_MULTIPLIER:g}")
        if not self.private:
            for name in ("max_grad_norm", "dp_delta", "epsilon_budget"):
                if getattr(self, name):
                    raise InvalidConfig(f"{name}: {getattr(self, name)} needs noise_multiplier > 0 (DP-SGD); "
                                        f"set noise_multiplier, or {name} = 0")
            return
        if self.max_grad_norm <= 0:
            raise InvalidConfig(f"max_grad_norm: DP-SGD (noise_multiplier {self.noise_multiplier}) needs a per-example "
                                "clipping bound > 0, e.g. 1.0")
        if not 0 < self.dp_delta < 1:
            raise InvalidConfig(f"dp_delta: {self.dp_delta} must be in (0, 1) with DP-SGD, e.g. 1e-5 (below "
                                "1 / the examples a worker holds)")

    def examples_per_round(self, dataset_size: int) -> int:
        """Examples one round of this config processes over `dataset_size` examples:
        every epoch takes max_batches batches, or the whole data set when max_batches is 0
        (or when it holds fewer)."""
        per_epoch = dataset_size if not self.max_batches else min(dataset_size, self.max_batches * self.batch_size)
        return self.epochs * per_epoch

    def require_work_within(self, dataset_size: int, limit: int) -> None:
        """Refuse a round over `limit` examples, naming the fields and the setting."""
        examples = self.examples_per_round(dataset_size)
        if examples > limit:
            batches = "0 (the whole data set)" if not self.max_batches else str(self.max_batches)
            raise InvalidConfig(
                f"config: epochs {self.epochs} x max_batches {batches} x batch_size {self.batch_size} over "
                f"{dataset_size} examples is {examples} examples, over this worker's {WORK_SETTING} of {limit}"
            )


def work_limit(value: int) -> int:
    """A worker's --max-examples-per-round, checked once at start-up."""
    if value < 1:
        raise InvalidConfig(f"{WORK_SETTING}: {value} must be at least 1")
    return value
