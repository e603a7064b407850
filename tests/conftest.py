"""Shared fixtures: tiny learnable MNIST-shaped data written as real IDX files, free
ports, and the real MNIST folder when the environment names one."""

from __future__ import annotations

import gzip
import os
import socket
import struct
from pathlib import Path

import pytest
import torch

from jetfed.data import DATA_DIR_ENV


def write_idx(path: Path, tensor: torch.Tensor, compress: bool = True) -> Path:
    """Write a uint8 tensor as an IDX file (the MNIST container)."""
    data = tensor.to(torch.uint8).contiguous()
    header = struct.pack(">BBBB", 0, 0, 0x08, data.dim()) + struct.pack(f">{data.dim()}I", *data.shape)
    raw = header + data.numpy().tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(raw, compresslevel=1))
    else:
        path.write_bytes(raw)
    return path


def synthetic_digits(count: int, seed: int) -> tuple:
    """Images where each label is a bright 7x7 block at its own place, plus noise:
    learnable in a few rounds, so integration tests can assert that accuracy rises."""
    rng = torch.Generator().manual_seed(seed)
    labels = torch.arange(count) % 10
    labels = labels[torch.randperm(count, generator=rng)]
    images = torch.randint(0, 60, (count, 28, 28), generator=rng)
    for label in range(10):
        row, col = 2 + (label // 5) * 13, 1 + (label % 5) * 5
        mask = labels == label
        images[mask, row:row + 7, col:col + 5] += 180
    return images.clamp(0, 255).to(torch.uint8), labels.to(torch.uint8)


def make_tiny_mnist(folder: Path, train: int = 600, test: int = 200, compress: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for split, count, seed in (("train", train, 1), ("t10k", test, 2)):
        images, labels = synthetic_digits(count, seed)
        write_idx(folder / f"{split}-images-idx3-ubyte", images, compress)
        write_idx(folder / f"{split}-labels-idx1-ubyte", labels, compress)
    return folder


@pytest.fixture(scope="session")
def tiny_mnist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_mnist(tmp_path_factory.mktemp("tiny-mnist"))


@pytest.fixture(scope="session")
def real_mnist() -> Path:
    """The real MNIST folder from $JETFED_DATA_DIR; CI always sets it."""
    folder = os.environ.get(DATA_DIR_ENV)
    if not folder or not Path(folder).is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"CI must point ${DATA_DIR_ENV} at the MNIST folder (got {folder!r})")
        pytest.skip(f"set ${DATA_DIR_ENV} to a folder holding the MNIST IDX files")
    return Path(folder)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
