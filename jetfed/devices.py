"""Choosing where a service computes, once, at start-up."""

from __future__ import annotations

import logging
from typing import Optional

import torch

from jetfed.errors import InvalidConfig

log = logging.getLogger(__name__)


def resolve_device(choice: str) -> torch.device:
    """`auto` takes CUDA when present (a Jetson's GPU), else the CPU; asking for CUDA
    on a machine without it is an error, not a silent fallback."""
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cpu":
        return torch.device("cpu")
    if choice.startswith("cuda"):
        if not torch.cuda.is_available():
            why = "was built without CUDA" if torch.version.cuda is None else "sees no GPU"
            raise InvalidConfig(f"device: {choice!r} requested but CUDA is not available here (torch "
                                f"{torch.__version__} {why}): use --device cpu, or auto to take a GPU where "
                                "there is one")
        try:
            device = torch.device(choice)
        except RuntimeError:
            raise InvalidConfig(f"device: {choice!r} is not cuda or cuda:N") from None
        count = torch.cuda.device_count()
        if device.type != "cuda" or (device.index is not None and device.index >= count):
            raise InvalidConfig(f"device: {choice!r} names no GPU here: this machine has {count} "
                                f"(cuda:0{f' to cuda:{count - 1}' if count > 1 else ''}); use one of those or auto")
        return device
    raise InvalidConfig(f"device: {choice!r} is not auto, cpu, cuda or cuda:N")


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
