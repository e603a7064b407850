from __future__ import annotations

import gzip
import struct
from pathlib import Path

import pytest
import torch
from tests.conftest import make_tiny_mnist, write_idx

from jetfed.data import LabeledImages, _read_idx, load_mnist, parse_labels, read_idx, resolve_data_dir
from jetfed.errors import DataNotFound, InvalidConfig


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("0-3", {0, 1, 2, 3}),
        ("4,5,6", {4, 5, 6}),
        ("0-3,7", {0, 1, 2, 3, 7}),
        (" 7 - 9 ", {7, 8, 9}),
        ("2,2,2-3", {2, 3}),
        ("5", {5}),
        ("all", set(range(10))),
    ],
)
def test_parse_labels(spec, expected):
    assert parse_labels(spec) == frozenset(expected)


@pytest.mark.parametrize("spec", ["3-1", "a", "10", "", "1,,2", "-1", "0-3-5", "0-10", "all,1"])
def test_parse_labels_refuses_bad_specs(spec):
    with pytest.raises(InvalidConfig, match=r"^labels: "):
        parse_labels(spec)


def test_parse_labels_respects_num_classes():
    assert parse_labels("all", num_classes=3) == frozenset({0, 1, 2})
    with pytest.raises(InvalidConfig, match=r"\[3\] outside 0\.\.2"):
        parse_labels("0-3", num_classes=3)


@pytest.mark.parametrize("compress", [True, False])
def test_read_idx_round_trips(tmp_path, compress):
    tensor = torch.arange(2 * 3 * 4, dtype=torch.uint8).reshape(2, 3, 4)
    path = write_idx(tmp_path / "x-idx3-ubyte", tensor, compress=compress)
    assert path.name.endswith(".gz") == compress
    loaded = read_idx(path)
    assert loaded.dtype == torch.uint8
    assert torch.equal(loaded, tensor)


def idx_bytes(ndim_shape, data, magic=b"\x00\x00\x08"):
    return magic + bytes([len(ndim_shape)]) + struct.pack(f">{len(ndim_shape)}I", *ndim_shape) + data


@pytest.mark.parametrize(
    "raw, message",
    [
        (b"", "bad magic"),
        (idx_bytes((3,), b"abc", magic=b"\x01\x00\x08"), "bad magic"),
        (idx_bytes((3,), b"abc", magic=b"\x00\x00\x0d"), "0x0d is not supported"),
        (idx_bytes((4,), b"abc"), "holds 3 bytes of data, its header promises 4"),
        (idx_bytes((2,), b"abc"), "holds 3 bytes of data, its header promises 2"),
    ],
)
def test_read_idx_refuses_broken_files(tmp_path, raw, message):
    path = tmp_path / "broken-idx1-ubyte"
    path.write_bytes(raw)
    with pytest.raises(DataNotFound, match=message):
        read_idx(path)


def test_read_idx_refuses_a_truncated_header(tmp_path):
    path = tmp_path / "short-idx3-ubyte"
    path.write_bytes(b"\x00\x00\x08\x03" + struct.pack(">I", 5))
    with pytest.raises(DataNotFound):
        read_idx(path)


def test_read_idx_refuses_a_truncated_gzip(tmp_path):
    path = tmp_path / "short-idx1-ubyte.gz"
    path.write_bytes(gzip.compress(idx_bytes((5,), b"12345"))[:-6])
    with pytest.raises(DataNotFound):
        read_idx(path)


def test_missing_files_without_download_say_how_to_supply_them(tmp_path):
    with pytest.raises(DataNotFound) as caught:
        load_mnist(tmp_path, "train", download=False)
    message = str(caught.value)
    assert str(tmp_path) in message
    assert "train-images-idx3-ubyte" in message
    assert "downloading is off" in message
    assert "--data-dir" in message and "$JETFED_DATA_DIR" in message


def test_missing_labels_alone_is_not_found(tmp_path):
    write_idx(tmp_path / "t10k-images-idx3-ubyte", torch.zeros(3, 28, 28))
    with pytest.raises(DataNotFound, match="t10k-labels-idx1-ubyte"):
        load_mnist(tmp_path, "test", download=False)


def test_images_and_labels_of_different_lengths_are_refused(tmp_path):
    write_idx(tmp_path / "t10k-images-idx3-ubyte", torch.zeros(3, 28, 28))
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", torch.zeros(4))
    with pytest.raises(DataNotFound, match="do not form an image set"):
        load_mnist(tmp_path, "test", download=False)


def test_loads_tiny_mnist(tiny_mnist):
    train = load_mnist(tiny_mnist, "train", download=False)
    test = load_mnist(tiny_mnist, "test", download=False)
    assert (len(train), len(test)) == (600, 200)
    assert train.images.shape == (600, 28, 28) and train.images.dtype == torch.uint8
    assert train.labels.dtype == torch.int64
    assert train.label_counts() == [60] * 10


@pytest.mark.parametrize("compress", [True, False])
def test_finds_files_in_torchvision_layout(tmp_path, compress):
    make_tiny_mnist(tmp_path / "MNIST" / "raw", train=50, test=20, compress=compress)
    assert len(load_mnist(tmp_path, "train", download=False)) == 50
    assert len(load_mnist(tmp_path, "test", download=False)) == 20


def test_subset_keeps_pairs_and_order():
    labels = torch.tensor([3, 0, 7, 3, 9, 1])
    images = torch.arange(6, dtype=torch.uint8).reshape(6, 1, 1).expand(6, 28, 28)
    subset = LabeledImages(images, labels).subset(frozenset({3, 9}))
    assert subset.labels.tolist() == [3, 3, 9]
    assert subset.images[:, 0, 0].tolist() == [0, 3, 4]
    assert subset.label_counts() == [0, 0, 0, 2, 0, 0, 0, 0, 0, 1]
    assert len(LabeledImages(images, labels).subset(frozenset())) == 0


def test_subset_of_tiny_mnist(tiny_mnist):
    subset = load_mnist(tiny_mnist, "train", download=False).subset(parse_labels("0-3"))
    assert len(subset) == 240
    assert subset.label_counts() == [60, 60, 60, 60, 0, 0, 0, 0, 0, 0]


def test_resolve_data_dir_precedence(monkeypatch):
    monkeypatch.setenv("JETFED_DATA_DIR", "/from/env")
    assert resolve_data_dir("/from/flag") == Path("/from/flag")
    assert resolve_data_dir(None) == Path("/from/env")
    monkeypatch.delenv("JETFED_DATA_DIR")
    assert resolve_data_dir(None) == Path("data")
    assert resolve_data_dir("~/mnist") == Path.home() / "mnist"


REAL_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]


@pytest.fixture(scope="module")
def real_train(real_mnist):
    return load_mnist(real_mnist, "train", download=False)


def test_real_mnist_label_counts(real_train):
    assert len(real_train) == 60000
    assert real_train.label_counts() == REAL_TRAIN_COUNTS


@pytest.mark.parametrize("spec, total", [("0-3", 24754), ("4-6", 17181), ("7-9", 18065)])
def test_real_mnist_partitions(real_train, spec, total):
    labels = parse_labels(spec)
    subset = real_train.subset(labels)
    assert len(subset) == total
    assert subset.label_counts() == [c if i in labels else 0 for i, c in enumerate(REAL_TRAIN_COUNTS)]


def test_real_mnist_test_split(real_mnist):
    test = load_mnist(real_mnist, "test", download=False)
    assert len(test) == 10000
    assert test.images.shape == (10000, 28, 28)


@pytest.mark.parametrize("compress", [False, True])
def test_load_mnist_keeps_only_the_rows_asked_for_with_their_labels(tiny_mnist, tmp_path, compress):
    whole = load_mnist(tiny_mnist, "train", download=False)
    asked = []

    def keep(labels):
        asked.append(labels)
        return torch.nonzero(labels % 3 == 1).flatten()

    kept = load_mnist(tiny_mnist, "train", download=False, keep=keep)
    rows = torch.nonzero(whole.labels % 3 == 1).flatten()
    assert torch.equal(asked[0], whole.labels)
    assert torch.equal(kept.images, whole.images[rows]) and torch.equal(kept.labels, whole.labels[rows])
    # Rows across many read blocks (1-byte rows: a block holds 1 MiB of them), first and last included.
    data = bytes(range(256)) * 9000
    path = tmp_path / ("rows-idx1-ubyte.gz" if compress else "rows-idx1-ubyte")
    path.write_bytes(gzip.compress(idx_bytes((len(data),), data)) if compress else idx_bytes((len(data),), data))
    picked = torch.tensor([0, 5, (1 << 20) - 1, 1 << 20, (1 << 20) + 7, len(data) - 1])
    values, shape = _read_idx(path, picked)
    assert shape == (len(data),)
    assert values.tolist() == [data[i] for i in picked.tolist()]


def test_rows_out_of_order_or_range_are_refused(tmp_path):
    path = tmp_path / "rows-idx1-ubyte"
    path.write_bytes(idx_bytes((4,), b"abcd"))
    for rows in ([2, 1], [0, 4], [-1]):
        with pytest.raises(DataNotFound, match="rows to keep must be ascending indices below 4"):
            _read_idx(path, torch.tensor(rows))
    assert _read_idx(path, torch.tensor([1, 3]))[0].tolist() == [ord("b"), ord("d")]
