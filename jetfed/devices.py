"""Choosing where a service computes, once, at start-up."""

from __future__ import annotations

import logging
from typing import Callable, Optional

import torch

from jetfed.errors import InvalidConfig

log = logging.getLogger(__name__)


def resolve_device(choice: str, *, spell: Callable[[str], str] = lambda value: f"--device {value}") -> torch.device:
    """`auto` takes CUDA when present (a Jetson's GPU), else the CPU; asking for CUDA
    on a machine without it is an error, not a silent fallback. `spell` writes a value
    as the user sets it (`--device cpu`, or `DEVICE=cpu` under make) in the refusals."""
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cpu":
        return torch.device("cpu")
    if choice.startswith("cuda"):
        if not torch.cuda.is_available():
            why = "was built without CUDA" if torch.version.cuda is None else "sees no GPU"
            raise InvalidConfig(f"{spell(choice)}: CUDA is not available here (torch {torch.__version__} {why}); "
                                f"use {spell('cpu')}, or {spell('auto')} to take a GPU where there is one")
        try:
            device = torch.device(choice)
        except RuntimeError:
            raise InvalidConfig(f"{spell(choice)}: not cuda or cuda:N (N counts from 0)") from None
        count = torch.cuda.device_count()
        if device.type != "cuda" or (device.index is not None and device.index >= count):
            gpus = "cuda:0" if count == 1 else f"cuda:0 to cuda:{count - 1}"
            raise InvalidConfig(f"{spell(choice)}: this machine has {count} GPU{'s' if count > 1 else ''} "
                                f"({gpus}); use one of those or {spell('auto')}")
        return device
    raise InvalidConfig(f"{spell(choice)}: not one of auto, cpu, cuda or cuda:N ({spell('auto')} takes a GPU "
                        "where there is one, else the CPU)")


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    return "cpu"


def set_threads(threads: Optional[int]) -> None:
    """Co-located services must share the cores: three processes each running torch's
    default thread pool on two cores thrash (see the federation issue's figures)."""
    if threads:
        if threads < 1:
            raise InvalidConfig(f"threads: {threads} must be at least 1")
        torch.set_num_threads(threads)
        log.info("torch threads=%d", threads)
