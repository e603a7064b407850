"""--device, resolved once at start-up: what each choice gives and how a wrong one is
refused. The CUDA cases run where torch sees a GPU (the device check runs them there)."""

from __future__ import annotations

import pytest
import torch

from jetfed.devices import describe, resolve_device
from jetfed.errors import InvalidConfig

CUDA = torch.cuda.is_available()


def test_cpu_is_the_cpu_and_auto_takes_a_gpu_only_where_there_is_one() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if CUDA else "cpu")
    assert describe(torch.device("cpu")) == "cpu"


@pytest.mark.parametrize("choice", ["tpu", "gpu", "CUDA", ""])
def test_an_unknown_device_is_refused_with_the_choices(choice: str) -> None:
    with pytest.raises(InvalidConfig, match=rf"--device {choice}: not one of auto, cpu, cuda or cuda:N"):
        resolve_device(choice)


@pytest.mark.skipif(CUDA, reason="this machine has CUDA")
@pytest.mark.parametrize("choice", ["cuda", "cuda:0"])
def test_cuda_without_a_gpu_is_refused_with_the_fix(choice: str) -> None:
    fix = r"use --device cpu, or --device auto"
    with pytest.raises(InvalidConfig, match=rf"--device {choice}: CUDA is not available here .*; {fix}"):
        resolve_device(choice)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_cuda_takes_the_gpu_and_names_it() -> None:
    device = resolve_device("cuda")
    assert device.type == "cuda"
    assert describe(device).startswith("cuda:0 (")
    assert resolve_device("cuda:0") == torch.device("cuda:0")


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_a_gpu_index_past_the_machines_gpus_is_refused() -> None:
    count = torch.cuda.device_count()
    with pytest.raises(InvalidConfig, match=rf"--device cuda:{count}: this machine has {count} GPU"):
        resolve_device(f"cuda:{count}")
    with pytest.raises(InvalidConfig, match="--device cuda:x: not cuda or cuda:N"):
        resolve_device("cuda:x")


def test_a_refusal_spells_the_values_as_the_user_sets_them() -> None:
    with pytest.raises(InvalidConfig, match="DEVICE=tpu: not one of") as refused:
        resolve_device("tpu", spell=lambda value: f"DEVICE={value}")
    assert "--device" not in str(refused.value)
