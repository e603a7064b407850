"""`--config federation.toml`: the federation described in one file. Keys are the
command line's flag names with underscores, grouped in sections; flags override them.
Unknown keys and wrong types fail at start-up, naming the key."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Dict, List, Mapping, Tuple

from jetfed.errors import InvalidConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # JetPack's Python 3.8/3.10
    import tomli as tomllib

class WorkerCount:
    """A key taking a number of workers or "all" (min_workers)."""


_KIND_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false",
               WorkerCount: 'an integer or "all"', dict: "a table, e.g. { image_size = 64 }"}

_SECTIONS: Dict[str, Dict[str, type]] = {
    "federation": {"rounds": int, "eval_every": int, "task": str, "model": str, "init_weights": str, "seed": int,
                   "out": str, "status_address": str, "metrics_address": str, "workers_dns": str,
                   # Secure aggregation (coordinator.secure_rounds): false is today's plain rounds.
                   "secure_aggregation": bool, "secagg_threshold": int, "secagg_clip": float,
                   "secagg_max_workers": int,
                   # Compressed weights (jetfed.compression): "raw" is today's whole fp32 model.
                   "uplink_encoding": str, "downlink_encoding": str},
    "training": {
        "optimizer": str, "lr": float, "lr_decay": float, "lr_min_factor": float, "momentum": float,
        "batch_size": int, "batches": int, "epochs": int, "weighting": str, "max_norm_ratio": float,
        # DP-SGD on the workers (jetfed.privacy): all 0 is plain training.
        "dp_noise_multiplier": float, "dp_max_grad_norm": float, "dp_delta": float, "dp_epsilon_budget": float,
    },
    "faults": {
        "round_timeout": float, "eval_timeout": float, "connect_timeout": float, "min_workers": WorkerCount,
        "round_retries": int, "max_backoff": float, "max_concurrency": int,
    },
    "transport": {"chunk_bytes": int, "max_payload_bytes": int},
}
# Keys besides `address` tell one launcher (`make run-local`) how to start each service:
# its partition, data folder and emulated slowness, and ([task]) the task's options; the coordinator never
# reads them (boards get the same as flags).
_WORKER_KEYS = {"address": str, "labels": str, "shard": str, "dirichlet": float, "partition_seed": int,
                "data_dir": str, "slowdown": float}
_EVALUATOR_KEYS = {"name": str, "address": str, "data_dir": str}
_TASK_KEYS = {"options": dict, "data_dir": str}


def _check(where: str, table: Any, allowed: Mapping[str, type]) -> Dict[str, Any]:
    if not isinstance(table, dict):
        raise InvalidConfig(f"config: [{where}] must be a table")
    for key, value in table.items():
        if key not in allowed:
            raise InvalidConfig(f"config: unknown key {key!r} in [{where}]; known: {', '.join(sorted(allowed))}")
        if not _has_type(value, allowed[key]):
            raise InvalidConfig(f"config: [{where}] {key} = {value!r} must be {_KIND_NAMES[allowed[key]]}")
    return dict(table)


def _has_type(value: Any, want: type) -> bool:
    if isinstance(value, bool):  # TOML booleans are ints to Python
        return want is bool
    if want is float:
        return isinstance(value, (int, float))
    if want is WorkerCount:
        return isinstance(value, int) or value == "all"
    return isinstance(value, want)


def load_config(path: Path) -> Dict[str, Any]:
    """Flag-named settings from a TOML file (`worker` as NAME=ADDRESS pairs)."""
    document = _read(path)
    values: Dict[str, Any] = {}
    for section, table in document.items():
        if section in _SECTIONS:
            values.update(_check(section, table, _SECTIONS[section]))
        elif section == "workers":
            values["worker"] = _workers(table)
        elif section == "strategy":
            values.update(_strategy(table))
        elif section == "task":
            _task_options(_check("task", table, _TASK_KEYS))
        elif section == "evaluator":
            evaluator = _check("evaluator", table, _EVALUATOR_KEYS)
            if "address" not in evaluator:
                raise InvalidConfig("config: [evaluator] needs an address")
            values["evaluator"] = f"{evaluator.get('name', 'testing')}={evaluator['address']}"
        else:
            raise InvalidConfig(
                f"config: unknown section [{section}]; known: "
                + ", ".join(sorted([*_SECTIONS, "strategy", "task", "workers", "evaluator"]))
            )
    return values


def _strategy(table: Any) -> Dict[str, Any]:
    """[strategy]: `name`, and the strategy's parameters as keys (checked against the
    strategy once flags are merged: a flag may name another strategy)."""
    if not isinstance(table, dict):
        raise InvalidConfig("config: [strategy] must be a table, e.g. name = \"fedavgm\"")
    params = {key: value for key, value in table.items() if key != "name"}
    for key, value in params.items():
        if isinstance(value, (dict, list)):
            raise InvalidConfig(f"config: [strategy] {key} must be a number or a string")
    values: Dict[str, Any] = {"strategy_params": params}
    if "name" in table:
        if not isinstance(table["name"], str):
            raise InvalidConfig(f"config: [strategy] name = {table['name']!r} must be a string")
        values["strategy"] = table["name"]
    return values


def _read(path: Path) -> Dict[str, Any]:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise InvalidConfig(f"config: cannot read {path}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError:
        raise InvalidConfig(f"config: {path} is not a text file (TOML must be UTF-8)") from None
    except tomllib.TOMLDecodeError as exc:
        raise InvalidConfig(f"config: {path} is not valid TOML: {exc}") from exc


def _workers(table: Any) -> List[Tuple[str, str]]:
    if not isinstance(table, dict):
        raise InvalidConfig("config: [workers] must hold one table per worker, e.g. [workers.alice]")
    workers = []
    for name, spec in table.items():
        spec = _check(f"workers.{name}", spec, _WORKER_KEYS)
        if "address" not in spec:
            raise InvalidConfig(f"config: [workers.{name}] needs an address")
        workers.append((name, spec["address"]))
    return workers


def _task_options(task: Dict[str, Any]) -> Dict[str, str]:
    options = task.get("options", {})
    for key, value in options.items():
        if isinstance(value, (dict, list)):
            raise InvalidConfig(f"config: [task] options.{key} must be a string or a number")
    return {key: str(value).lower() if isinstance(value, bool) else str(value) for key, value in options.items()}


def service_flags(path: Path, data_dir: Path) -> Dict[str, List[str]]:
    """The flags one launcher (`make run-local`) starts each worker and the evaluator
    with, by name: the task ([federation] task and model), its [task] options, the data
    folder (the service's `data_dir`, else [task]'s, else `data_dir`; relative paths
    from the config's folder) and each worker's partition."""
    document = _read(path)
    federation = _check("federation", document.get("federation", {}), _SECTIONS["federation"])
    task = _check("task", document.get("task", {}), _TASK_KEYS)
    common = ["--task", federation.get("task", "mnist")]
    if "model" in federation:
        common += ["--model", federation["model"]]
    for key, value in _task_options(task).items():
        common += ["--option", f"{key}={value}"]

    def folder(spec: Dict[str, Any]) -> str:
        chosen = spec.get("data_dir", task.get("data_dir"))
        return str(data_dir if chosen is None else (path.parent / Path(chosen).expanduser()))

    flags: Dict[str, List[str]] = {}
    for name, spec in document.get("workers", {}).items():
        spec = _check(f"workers.{name}", spec, _WORKER_KEYS)
        own = ["--labels", spec.get("labels", "all"), "--partition-seed", str(spec.get("partition_seed", 0))]
        if "shard" in spec:
            own += ["--shard", spec["shard"]]
        if "dirichlet" in spec:
            own += ["--dirichlet", str(spec["dirichlet"])]
        if "slowdown" in spec:  # emulates a slower board (straggler studies)
            own += ["--slowdown", str(spec["slowdown"])]
        flags[name] = [*common, "--data-dir", folder(spec), *own]
    evaluator = _check("evaluator", document.get("evaluator", {}), _EVALUATOR_KEYS)
    flags[evaluator.get("name", "testing")] = [*common, "--data-dir", folder(evaluator)]
    return flags
