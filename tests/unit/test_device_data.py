"""The mnist task's examples: uint8 images normalised batch by batch give the model the
very bits the whole-set normalisation gave, at a quarter of the memory."""

from __future__ import annotations

import pytest
import torch

from jetfed.data import LabeledImages
from jetfed.errors import InvalidConfig
from jetfed.training import MNIST_MEAN, MNIST_STD, DeviceData

CPU = torch.device("cpu")


def images(count: int = 300) -> LabeledImages:
    generator = torch.Generator().manual_seed(5)
    return LabeledImages(torch.randint(0, 256, (count, 28, 28), dtype=torch.uint8, generator=generator),
                         torch.randint(0, 10, (count,), generator=generator))


def test_batches_carry_the_bits_of_the_whole_set_normalised_at_once() -> None:
    raw = images()
    data = DeviceData.from_images(raw, CPU)
    whole = ((raw.images.float() / 255.0 - MNIST_MEAN) / MNIST_STD).unsqueeze(1)  # the former layout
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(1))
    for index in (order[:32], order[32:97], order[97:]):
        inputs, labels = next(data.batches([index]))
        assert inputs.dtype == torch.float32 and inputs.shape == (len(index), 1, 28, 28)
        assert torch.equal(inputs, whole[index])
        assert torch.equal(labels, raw.labels[index])
    assert torch.equal(data.inputs, whole)


def test_the_images_stay_uint8_and_a_subset_keeps_the_kind() -> None:
    raw = images()
    data = DeviceData.from_images(raw, CPU)
    assert data.images.dtype == torch.uint8
    assert data.images.element_size() * data.images.nelement() == 300 * 28 * 28
    keep = raw.labels < 5
    part = data.subset(keep)
    assert isinstance(part, DeviceData) and len(part) == int(keep.sum())
    assert torch.equal(part.inputs, data.inputs[keep])
    assert part.label_counts(10)[5:] == [0] * 5


def test_float_images_are_refused_with_the_expected_layout() -> None:
    with pytest.raises(InvalidConfig, match=r"MNIST images must be uint8 \(N, H, W\), not torch.float32"):
        DeviceData(torch.rand(4, 1, 28, 28), torch.zeros(4, dtype=torch.long), CPU)
