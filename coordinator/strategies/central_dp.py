"""Central (user-level) differential privacy on the coordinator: DP-FedAvg (McMahan et
al. 2018, "Learning Differentially Private Recurrent Language Models") with fixed or
adaptive clipping (Andrew et al. 2021, "Differentially Private Learning with Adaptive
Clipping"), as the aggregator `dp-mean`, so any server optimizer composes with it
(`--strategy dp-fedavg`, or `--strategy fedavgm --strategy-param aggregator=dp-mean`).

Each round, from the m updates of the round's sample (m = --strategy-param sample,
or the fleet):

- each worker's delta is clipped to L2 norm S over all its floating tensors together;
- the clipped deltas are summed with equal weights (a worker's example count would
  let one worker count for more than S), Gaussian noise of standard deviation z_d S is
  added to every coordinate, and the sum is divided by m;
- adaptive clipping (target quantile gamma > 0): the fraction of updates within S is
  noised (N(0, sigma_b^2) on the count) and S moves geometrically toward the gamma
  quantile of the norms, S <- S exp(-eta (b - gamma)). The two noises share the
  budget: z_d = (z^-2 - (2 sigma_b)^-2)^-1/2, so the round as a whole is the Gaussian
  mechanism with noise multiplier z (Andrew et al., Theorem 1). Fixed clipping: z_d = z.

Accounting: each round is one step of the sampled Gaussian mechanism with noise
multiplier z at sampling rate q = m / fleet size, composed by Opacus's RDP accountant
(jetfed.privacy.epsilon_of); the round's (epsilon, delta) goes into the round's record
(metrics.jsonl "strategy"). The RDP analysis is for Poisson sampling; the sample here
is a fixed-size draw, the usual approximation (exact when every worker trains, q = 1).

What it protects: whether any one worker took part at all, all its data together, as
seen by whoever gets the models (the released model, the evaluator, the workers). Not
against the coordinator, which sees every update in the clear (use DP-SGD on the
workers, jetfed.privacy, or secure aggregation for that). Few workers make it costly:
the noise is z S / m on the mean, so the fleets it is made for have hundreds.

The noise is drawn from a generator keyed by a secret this coordinator draws once per
run from the operating system's entropy and keeps in its checkpoint (so a resumed run
is the unbroken one), and by the round: nobody who knows the run's --seed can replay it."""

from __future__ import annotations

import hashlib
import math
import secrets
from typing import Any, Dict, List, Mapping, Sequence

import torch

from coordinator.strategies.aggregate import Aggregator, Deltas
from jetfed import privacy
from jetfed.codec import StateDict
from jetfed.errors import InvalidConfig
from jetfed.privacy import Spend


def effective_noise(noise_multiplier: float, quantile_noise: float) -> float:
    """z_d, the noise multiplier left for the deltas when the clipped count takes
    sigma_b of the budget (Andrew et al. 2021, Theorem 1)."""
    rest = noise_multiplier ** -2 - (2 * quantile_noise) ** -2
    if rest <= 0:
        raise InvalidConfig(f"strategy: dp_quantile_noise {quantile_noise:g} leaves no noise for the updates: adaptive "
                            f"clipping needs 2 x dp_quantile_noise > dp_noise ({noise_multiplier:g}); raise "
                            "dp_quantile_noise, or set dp_quantile = 0 (fixed clipping)")
    return rest ** -0.5


class CentralDP(Aggregator):
    name = "dp-mean"

    def __init__(
        self, noise_multiplier: float, clip: float, delta: float, *, expected: int, fleet_size: int,
        target_quantile: float = 0.0, clip_lr: float = 0.2, quantile_noise: float = 0.0,
    ) -> None:
        super().__init__(0)
        if noise_multiplier <= 0:
            raise InvalidConfig("strategy: dp_noise must be > 0 with aggregator dp-mean (its noise multiplier z)")
        if clip <= 0:
            raise InvalidConfig("strategy: dp_clip must be > 0 with aggregator dp-mean (the initial clipping norm)")
        if not 0 < delta < 1:
            raise InvalidConfig(f"strategy: dp_delta {delta:g} must be in (0, 1), e.g. below 1 / the fleet's size")
        privacy.require_library()
        self.noise_multiplier = noise_multiplier
        self.delta = delta
        self.expected = max(1, expected)
        self.sample_rate = min(1.0, self.expected / max(1, fleet_size))
        self.target_quantile = target_quantile
        self.clip_lr = clip_lr
        self.quantile_noise = quantile_noise or self.expected / 20
        self.update_noise = (effective_noise(noise_multiplier, self.quantile_noise) if target_quantile
                             else noise_multiplier)
        self.clip = clip
        self._key = secrets.randbits(63)
        self._rounds: List[Spend] = []
        self._note: Dict[str, object] = {}

    def workers_needed(self) -> int:
        return 1

    def _generator(self) -> torch.Generator:
        digest = hashlib.sha256(f"{self._key}/{len(self._rounds)}".encode()).digest()
        return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))

    def __call__(self, deltas: Deltas, weights: Sequence[float]) -> StateDict:
        generator = self._generator()
        clip = self.clip
        norms = [math.sqrt(sum(float(t.to(torch.float64).pow(2).sum()) for t in d.values())) for d in deltas]
        total: StateDict = {name: torch.zeros_like(t, dtype=torch.float64) for name, t in deltas[0].items()}
        for delta, norm in zip(deltas, norms):
            factor = min(1.0, clip / norm) if norm > 0 else 1.0
            for name, tensor in delta.items():
                total[name] += tensor.to(torch.float64) * factor
        std = self.update_noise * clip
        out = {name: (t + torch.normal(0.0, std, size=t.shape, generator=generator, dtype=torch.float64))
               / self.expected for name, t in total.items()}
        within = sum(1 for n in norms if n <= clip)
        if self.target_quantile:
            noisy = within + float(torch.normal(0.0, self.quantile_noise, size=(), generator=generator,
                                                dtype=torch.float64))
            self.clip = clip * math.exp(-self.clip_lr * (noisy / self.expected - self.target_quantile))
        self._rounds.append(Spend(len(self._rounds) + 1, self.noise_multiplier, self.sample_rate, 1))
        self._note = {"central_dp": {
            "epsilon": privacy.epsilon_of(self._rounds, self.delta), "delta": self.delta, "clip": clip,
            "next_clip": self.clip, "clipped": len(norms) - within, "updates": len(norms),
            "noise_std_of_mean": std / self.expected, "sample_rate": self.sample_rate,
        }}
        return out

    def epsilon(self) -> float:
        return privacy.epsilon_of(self._rounds, self.delta)

    def note(self) -> Dict[str, object]:
        return dict(self._note)

    def state_dict(self) -> StateDict:
        history = torch.tensor([[s.noise_multiplier, s.sample_rate, s.steps] for s in self._rounds],
                               dtype=torch.float64).reshape(-1, 3)
        return {"clip": torch.tensor(self.clip, dtype=torch.float64), "key": torch.tensor(self._key),
                "history": history}

    def load_state_dict(self, tensors: StateDict) -> None:
        if "clip" in tensors:
            self.clip = float(tensors["clip"])
        if "key" in tensors:
            self._key = int(tensors["key"])
        if "history" in tensors:
            self._rounds = [Spend(i + 1, float(z), float(q), int(k))
                            for i, (z, q, k) in enumerate(tensors["history"].tolist())]


def build(values: Mapping[str, Any], fleet_size: int) -> CentralDP:
    """The aggregator from a strategy's resolved parameters (registry)."""
    sample = int(values.get("sample", 0) or 0)
    expected = min(sample, fleet_size) if sample else fleet_size
    return CentralDP(float(values["dp_noise"]), float(values["dp_clip"]), float(values["dp_delta"]),
                     expected=expected, fleet_size=fleet_size, target_quantile=float(values["dp_quantile"]),
                     clip_lr=float(values["dp_clip_lr"]), quantile_noise=float(values["dp_quantile_noise"]))

