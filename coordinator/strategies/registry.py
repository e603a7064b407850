"""The strategies a run can name (`--strategy NAME`, `[strategy] name = ...`), each a
preset of parts: an aggregator, a server optimizer, what workers are told, and for the
asynchronous ones how updates are buffered. Every parameter is declared once here,
with its default, bounds and meaning: flags, federation.toml, validation and
`jetfed strategies` all read this table.

Any preset's parts can be swapped by parameter, which is how robust and adaptive rules
compose: `--strategy fedadam --strategy-param aggregator=median` is a robust FedAdam."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Tuple

from coordinator.strategies import aggregate, central_dp, server_opt
from coordinator.strategies.base import Composite
from coordinator.strategies.scaffold import Scaffold
from jetfed.errors import InvalidConfig

DEFAULT_STRATEGY = "fedavg"
AGGREGATORS = ("mean", "median", "trimmed-mean", "krum", "multi-krum", "centered-clip", "dp-mean")
OPTIMIZERS = ("plain", "momentum", "adam", "yogi", "adagrad")


@dataclass(frozen=True)
class Param:
    name: str
    kind: type  # int, float or str
    help: str
    low: float = -math.inf
    high: float = math.inf
    choices: Tuple[str, ...] = ()

    def parse(self, value: Any, strategy: str) -> Any:
        """`value` (from TOML, or a flag's text) as this parameter's type, in bounds."""
        where = f"strategy {strategy}: {self.name}"
        if self.kind is str:
            text = str(value)
            if text not in self.choices:
                raise InvalidConfig(f"{where} = {text!r} is not one of {', '.join(self.choices)}")
            return text
        try:
            if isinstance(value, bool):
                raise ValueError
            number = self.kind(value) if not isinstance(value, str) else self.kind(value.strip())
            if self.kind is int and isinstance(value, float) and value != int(value):
                raise ValueError
        except ValueError:
            raise InvalidConfig(f"{where} = {value!r} must be {'an integer' if self.kind is int else 'a number'}") \
                from None
        if not (math.isfinite(number) and self.low <= number <= self.high):
            raise InvalidConfig(f"{where} = {value!r} must be in [{self.low:g}, {self.high:g}]")
        return number


PARAMS: Dict[str, Param] = {p.name: p for p in (
    Param("aggregator", str, "how the round's deltas become one", choices=AGGREGATORS),
    Param("server_optimizer", str, "the server's step along the aggregated delta", choices=OPTIMIZERS),
    Param("server_lr", float, "server learning rate (1 with plain = FedAvg)", 1e-6, 100.0),
    Param("momentum", float, "server momentum (momentum optimizer)", 0.0, 0.999),
    Param("nesterov", int, "1: Nesterov's look-ahead step, lr * (momentum * m + delta) (momentum optimizer)", 0, 1),
    Param("beta1", float, "first-moment decay (adam, yogi, adagrad)", 0.0, 0.999),
    Param("beta2", float, "second-moment decay (adam, yogi)", 0.0, 0.999999),
    Param("tau", float, "adaptivity: added to sqrt(v) (adam, yogi, adagrad)", 1e-12, 10.0),
    Param("f", int, "hostile workers to withstand (robust aggregators)", 0, 1_000_000),
    Param("m", int, "updates multi-krum averages (0: n - f)", 0, 1_000_000),
    Param("clip_radius", float, "centered-clip radius tau (0: the median distance each round)", 0.0, 1e12),
    Param("iterations", int, "centered-clip iterations", 1, 100),
    Param("dp_noise", float, "central DP: noise multiplier z of the clipped sum (dp-mean)", 0.0, 1000.0),
    Param("dp_clip", float, "central DP: each update's delta clipped to this L2 norm (the start, with dp_quantile) "
          "(dp-mean)", 1e-9, 1e9),
    Param("dp_delta", float, "central DP: the delta epsilon is reported at (dp-mean)", 0.0, 1.0),
    Param("dp_quantile", float, "central DP: adaptive clipping toward this quantile of the update norms, Andrew et "
          "al. 2021 (0: fixed clipping at dp_clip) (dp-mean)", 0.0, 1.0),
    Param("dp_clip_lr", float, "central DP: adaptive clipping's geometric step eta (dp-mean)", 0.0, 10.0),
    Param("dp_quantile_noise", float, "central DP: noise on the count of unclipped updates, sigma_b (0: the "
          "expected updates / 20) (dp-mean)", 0.0, 1e6),
    Param("mu", float, "FedProx proximal term mu sent to workers (0: off)", 0.0, 1000.0),
    Param("sample", int, "workers drawn per round, seeded by --seed and the round (0: all)", 0, 1_000_000),
    Param("buffer_size", int, "updates per server step (asynchronous)", 1, 1_000_000),
    Param("max_staleness", int, "updates older than this many server steps are dropped (asynchronous)", 0, 1_000_000),
    Param("balance", int, "1: a slow worker's update counts its time per update over the fleet's mean, so its "
          "data weighs as a fast worker's (asynchronous)", 0, 1),
    Param("staleness_exponent", float, "an update s steps stale counts (1 + s)^-exponent (asynchronous)", 0.0, 10.0),
)}


@dataclass(frozen=True)
class Preset:
    name: str
    summary: str
    defaults: Mapping[str, Any]
    asynchronous: bool = False
    reference: str = ""
    # Parameters it does not take, because its algorithm fixes that part (scaffold's
    # aggregate is the mean of the updates, and its workers train without a proximal term).
    locked: Tuple[str, ...] = ()
    # SCAFFOLD's control variates: the server keeps c, the workers theirs.
    control_variates: bool = False


# The parameters each part reads, besides `aggregator` and `server_optimizer` themselves.
_AGGREGATOR_PARAMS = {"mean": (), "median": ("f",), "trimmed-mean": ("f",), "krum": ("f",),
                      "multi-krum": ("f", "m"), "centered-clip": ("f", "clip_radius", "iterations"),
                      "dp-mean": ("dp_noise", "dp_clip", "dp_delta", "dp_quantile", "dp_clip_lr", "dp_quantile_noise")}
_OPTIMIZER_PARAMS = {"plain": ("server_lr",), "momentum": ("server_lr", "momentum", "nesterov"),
                     "adam": ("server_lr", "beta1", "beta2", "tau"), "yogi": ("server_lr", "beta1", "beta2", "tau"),
                     "adagrad": ("server_lr", "beta1", "tau")}
_COMMON = ("aggregator", "server_optimizer", "mu", "sample")
_ASYNC = ("buffer_size", "max_staleness", "staleness_exponent", "balance")

# Each parameter's value where a preset sets none; a parameter added later takes here the
# value that behaves as before it existed (resume fills old checkpoints with it).
BASE = {"aggregator": "mean", "server_optimizer": "plain", "server_lr": 1.0, "momentum": 0.0, "nesterov": 0, "beta1": 0.9,
         "beta2": 0.99, "tau": 1e-3, "f": 1, "m": 0, "clip_radius": 0.0, "iterations": 3, "mu": 0.0, "sample": 0,
         "buffer_size": 2, "max_staleness": 8, "staleness_exponent": 0.0, "balance": 1, "dp_noise": 1.0,
         "dp_clip": 1.0, "dp_delta": 1e-5, "dp_quantile": 0.0, "dp_clip_lr": 0.2, "dp_quantile_noise": 0.0}

PRESETS: Dict[str, Preset] = {p.name: p for p in (
    Preset("fedavg", "the mean of the updates, weighted by examples (--weighting)", {},
           reference="McMahan et al. 2017"),
    Preset("fedavgm", "FedAvg with server momentum: faster on skewed data",
           {"server_optimizer": "momentum", "server_lr": 1.3, "momentum": 0.6}, reference="Hsu et al. 2019"),
    Preset("fedadam", "adaptive server step (Adam on the pseudo-gradient)",
           {"server_optimizer": "adam", "server_lr": 0.01}, reference="Reddi et al. 2021"),
    Preset("fedyogi", "adaptive server step (Yogi): steadier than fedadam when updates vary",
           {"server_optimizer": "yogi", "server_lr": 0.01}, reference="Reddi et al. 2021"),
    Preset("fedadagrad", "adaptive server step (Adagrad): steps shrink as the run goes on",
           {"server_optimizer": "adagrad", "server_lr": 0.01, "beta1": 0.0}, reference="Reddi et al. 2021"),
    Preset("fedprox", "FedAvg with a proximal term on the workers: local models stay near the global one",
           {"mu": 0.01}, reference="Li et al. 2020"),
    Preset("scaffold", "control variates correct each worker's drift toward its own data (plain SGD on the "
           "workers; each keeps its control variate in --state-dir)", {}, reference="Karimireddy et al. 2020",
           locked=("aggregator", "mu"), control_variates=True),
    Preset("scaffoldm", "SCAFFOLD with server momentum: drift corrected on the workers, steps carried on the "
           "server (the best measured here on boards that each hold few classes)",
           {"server_optimizer": "momentum", "server_lr": 1.6, "momentum": 0.6}, reference="Karimireddy et al. "
           "2020 with Hsu et al. 2019's server momentum", locked=("aggregator", "mu"), control_variates=True),
    Preset("median", "coordinate-wise median: withstands f hostile workers of 2f+1",
           {"aggregator": "median"}, reference="Yin et al. 2018"),
    Preset("trimmed-mean", "coordinate-wise mean without the f largest and smallest values (2f+1 workers)",
           {"aggregator": "trimmed-mean"}, reference="Yin et al. 2018"),
    Preset("krum", "the one update closest to its n-f-2 neighbours (2f+3 workers)",
           {"aggregator": "krum"}, reference="Blanchard et al. 2017"),
    Preset("multi-krum", "the mean of the n-f updates Krum scores best (2f+3 workers)",
           {"aggregator": "multi-krum"}, reference="Blanchard et al. 2017"),
    Preset("centered-clip", "each update's distance from the last step clipped, iterated (2f+1 workers)",
           {"aggregator": "centered-clip"}, reference="Karimireddy et al. 2021"),
    Preset("dp-fedavg", "central (user-level) DP: each delta clipped to dp_clip, Gaussian noise on the sum "
           "(dp_quantile=0.5: adaptive clipping toward the median norm); each round's epsilon in metrics.jsonl. "
           "For fleets of hundreds: the noise on the mean is dp_noise x dp_clip / the workers sampled",
           {"aggregator": "dp-mean"}, reference="McMahan et al. 2018; Andrew et al. 2021"),
    Preset("fedbuff", "asynchronous: workers never wait; a server step every buffer_size updates, stale ones "
           "discounted", {"buffer_size": 2, "max_staleness": 8, "staleness_exponent": 0.5},
           asynchronous=True, reference="Nguyen et al. 2022"),
    Preset("fedasync", "asynchronous: a server step for every update, mixed in by server_lr and its staleness",
           {"buffer_size": 1, "max_staleness": 8, "staleness_exponent": 0.5, "server_lr": 0.6},
           asynchronous=True, reference="Xie et al. 2019"),
)}


def parameters_of(preset: Preset, values: Mapping[str, Any]) -> List[str]:
    """The parameters a strategy reads given its parts (`values` chooses them)."""
    names = [*_COMMON, *_AGGREGATOR_PARAMS[values["aggregator"]], *_OPTIMIZER_PARAMS[values["server_optimizer"]]]
    if preset.asynchronous:
        names += _ASYNC
    return [name for name in dict.fromkeys(names) if name not in preset.locked]


def resolve(name: str, given: Mapping[str, Any]) -> Dict[str, Any]:
    """The strategy's full parameters: its preset's defaults, overridden by `given`,
    each parsed and checked; an unknown name or parameter is refused, naming the
    known ones."""
    preset = PRESETS.get(name)
    if preset is None:
        raise InvalidConfig(f"strategy: {name!r} is not a strategy; known: {', '.join(PRESETS)} "
                            "(`jetfed strategies` lists them with their parameters)")
    values = {**BASE, **preset.defaults}
    for key in ("aggregator", "server_optimizer"):
        if key in given and key not in preset.locked:
            values[key] = PARAMS[key].parse(given[key], name)
    allowed = parameters_of(preset, values)
    for key, value in given.items():
        if key not in allowed:
            raise InvalidConfig(f"strategy {name}: unknown parameter {key!r}; it takes {', '.join(allowed)}")
        values[key] = PARAMS[key].parse(value, name)
    return {key: values[key] for key in allowed}


@dataclass(frozen=True)
class StrategySpec:
    """A strategy by name and parameters, as settings and checkpoints hold it."""

    name: str = DEFAULT_STRATEGY
    params: Mapping[str, Any] = field(default_factory=dict)

    def resolved(self) -> Dict[str, Any]:
        return resolve(self.name, self.params)

    @property
    def asynchronous(self) -> bool:
        return self.name in PRESETS and PRESETS[self.name].asynchronous

    def build(self, *, weighting: str = "examples", seed: int = 0, fleet_size: int = 1) -> Composite:
        values = self.resolved()
        if PRESETS[self.name].control_variates:
            return Scaffold(self.name, optimizer=_optimizer(values), fleet_size=fleet_size, weighting=weighting,
                            sample=values["sample"], seed=seed)
        return Composite(
            self.name, aggregator=_aggregator(values), optimizer=_optimizer(values), weighting=weighting,
            staleness_exponent=values.get("staleness_exponent", 0.0), proximal_mu=values.get("mu", 0.0),
            sample=values["sample"], seed=seed,
        ) if values["aggregator"] != "dp-mean" else Composite(
            self.name, aggregator=central_dp.build(values, fleet_size), optimizer=_optimizer(values),
            weighting=weighting, staleness_exponent=values.get("staleness_exponent", 0.0),
            proximal_mu=values.get("mu", 0.0), sample=values["sample"], seed=seed,
        )

    def describe(self) -> str:
        values = self.resolved()
        return f"{self.name} ({', '.join(f'{k}={v}' for k, v in values.items())})"


def _aggregator(values: Mapping[str, Any]) -> aggregate.Aggregator:
    name, f = values["aggregator"], values.get("f", 0)
    builders: Dict[str, Callable[[], aggregate.Aggregator]] = {
        "mean": aggregate.Mean,
        "median": lambda: aggregate.Median(f),
        "trimmed-mean": lambda: aggregate.TrimmedMean(f),
        "krum": lambda: aggregate.Krum(f, 1),
        "multi-krum": lambda: aggregate.Krum(f, values["m"]),
        "centered-clip": lambda: aggregate.CenteredClip(f, values["clip_radius"], values["iterations"]),
    }
    return builders[name]()


def _optimizer(values: Mapping[str, Any]) -> server_opt.ServerOptimizer:
    name, lr = values["server_optimizer"], values["server_lr"]
    if name == "plain":
        return server_opt.Plain(lr)
    if name == "momentum":
        return server_opt.Momentum(lr, values["momentum"], nesterov=bool(values["nesterov"]))
    adaptive: Callable[..., server_opt.ServerOptimizer] = {"adam": server_opt.Adam, "yogi": server_opt.Yogi, "adagrad": server_opt.Adagrad}[name]
    return adaptive(lr, values["beta1"], values.get("beta2", 0.0), values["tau"])


def parse_param_flag(text: str) -> Tuple[str, str]:
    """`--strategy-param KEY=VALUE`."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise InvalidConfig(f"--strategy-param {text!r}: expected KEY=VALUE, e.g. momentum=0.7")
    return key.strip(), value.strip()
