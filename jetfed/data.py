"""MNIST from IDX files on the board's disk, and the label partitions that give each
worker its private share.

Files are found under the data directory itself or torchvision's `MNIST/raw/` layout,
gzip-compressed or not. A download is tried only when the files are missing, and a
failed one ends in an error that says which files, where they were looked for and where
to get them (`missing_mnist_files` and `how_to_get_mnist` let a launcher say the same
before it starts anything).
"""

from __future__ import annotations

import bisect
import gzip
import io
import logging
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, FrozenSet, List, Optional, Set, Tuple

import torch

from jetfed.errors import DataNotFound, InvalidConfig

log = logging.getLogger(__name__)

DATA_DIR_ENV = "JETFED_DATA_DIR"
NUM_CLASSES = 10
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_DTYPES = {0x08: torch.uint8}
_READ_STEP = 1 << 20
# Where the four IDX files come from: the MNIST page, and the mirror torchvision uses.
MNIST_SOURCES = ("http://yann.lecun.com/exdb/mnist/", "https://ossci-datasets.s3.amazonaws.com/mnist/")


@dataclass(frozen=True)
class LabeledImages:
    """Images as uint8 (N, 28, 28) and labels as int64 (N,)."""

    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def label_counts(self, num_classes: int = NUM_CLASSES) -> List[int]:
        return [int(c) for c in torch.bincount(self.labels, minlength=num_classes)]

    def subset(self, labels: FrozenSet[int]) -> "LabeledImages":
        keep = torch.zeros(len(self), dtype=torch.bool)
        for label in labels:
            keep |= self.labels == label
        return LabeledImages(self.images[keep], self.labels[keep])


def resolve_data_dir(flag: Optional[str]) -> Path:
    """The --data-dir flag wins, then $JETFED_DATA_DIR, then ./data."""
    return Path(flag or os.environ.get(DATA_DIR_ENV) or "data").expanduser()


def parse_labels(spec: str, num_classes: int = NUM_CLASSES) -> FrozenSet[int]:
    """`0-3`, `4,5,6`, `0-3,7` or `all`."""
    if spec.strip() == "all":
        return frozenset(range(num_classes))
    labels: Set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        try:
            if "-" in part:
                low, high = (int(x) for x in part.split("-", 1))
                if low > high:
                    raise ValueError
                labels.update(range(low, high + 1))
            else:
                labels.add(int(part))
        except ValueError:
            raise InvalidConfig(f"labels: cannot read {part!r} in {spec!r}; use ranges and lists like 0-3 or 4,5,6") from None
    out_of_range = sorted(x for x in labels if not 0 <= x < num_classes)
    if out_of_range:
        raise InvalidConfig(f"labels: {out_of_range} outside 0..{num_classes - 1}")
    return frozenset(labels)


def format_counts(counts: List[int]) -> str:
    per_label = ", ".join(f"{label}: {count}" for label, count in enumerate(counts))
    return f"{per_label}, total {sum(counts)}"


def load_mnist(
    data_dir: Path, split: str, download: bool = True,
    keep: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
) -> LabeledImages:
    """The split's images and labels; with `keep` (the labels -> ascending indices of the
    examples to keep, e.g. a partition's), only those images are held while reading:
    a worker with a fifth of the digits never holds all 47 MB of the training images."""
    images_stem, labels_stem = _FILES[split]
    images_path = find_mnist_file(data_dir, images_stem)
    labels_path = find_mnist_file(data_dir, labels_stem)
    if images_path is None or labels_path is None:
        if download:
            _download(data_dir)
            images_path = find_mnist_file(data_dir, images_stem)
            labels_path = find_mnist_file(data_dir, labels_stem)
        if images_path is None or labels_path is None:
            missing = [stem for stem in _FILES[split] if find_mnist_file(data_dir, stem) is None]
            raise DataNotFound(
                f"MNIST {split} files not found: missing {', '.join(s + '[.gz]' for s in missing)}, looked for in "
                f"{' and '.join(str(f) for f in mnist_folders(data_dir))}, and "
                f"{'the download failed' if download else 'downloading is off (--no-download)'}. "
                + how_to_get_mnist(data_dir, f"--data-dir or ${DATA_DIR_ENV}")
            )
    labels = read_idx(labels_path).long()
    rows = keep(labels) if keep is not None and labels.dim() == 1 else None
    images, shape = _read_idx(images_path, rows)
    if len(shape) != 3 or labels.dim() != 1 or shape[0] != labels.shape[0]:
        raise DataNotFound(
            f"{images_path} and {labels_path} do not form an image set: shapes {shape} and {tuple(labels.shape)}"
        )
    return LabeledImages(images, labels if rows is None else labels[rows])


def read_idx(path: Path) -> torch.Tensor:
    """Parse an IDX file (the MNIST container): magic, dims, then raw big-endian data."""
    return _read_idx(path)[0]


def _read_idx(path: Path, rows: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, Tuple[int, ...]]:
    """The IDX file's data, whole or only the first-dimension `rows` (ascending int64
    indices), and its shape in the file. The data is read in 1 MiB steps straight into
    the tensor kept (or a 1 MiB block, for rows): the 60,000 training images are 47 MB,
    and reading the file whole, then slicing off its header, held them three times."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            head = handle.read(4)
            if len(head) < 4 or head[0] != 0 or head[1] != 0:
                raise DataNotFound(f"{path}: not an IDX file (bad magic)")
            dtype, ndim = head[2], head[3]
            if dtype not in _IDX_DTYPES:
                raise DataNotFound(f"{path}: IDX element type 0x{dtype:02x} is not supported")
            dims = handle.read(4 * ndim)
            if len(dims) < 4 * ndim:
                raise DataNotFound(f"{path}: IDX header is cut short ({4 + len(dims)} of {4 + 4 * ndim} bytes)")
            shape: Tuple[int, ...] = struct.unpack(f">{ndim}I", dims)
            count = 1
            for dim in shape:
                count *= dim
            if rows is None or not shape:
                data = bytearray(count)
                filled = _fill(handle, memoryview(data))
                kept = torch.frombuffer(data, dtype=torch.uint8).reshape(shape) if count else \
                    torch.zeros(shape, dtype=torch.uint8)
            else:
                kept, filled = _read_rows(handle, shape, rows, path)
            extra = len(handle.read()) if filled == count else 0  # what lies past the promised data
    except (OSError, EOFError) as exc:  # a cut-short download or a mislabelled .gz
        raise DataNotFound(f"{path}: cannot be read ({exc}); copy the file again") from exc
    if filled + extra != count:
        raise DataNotFound(f"{path}: holds {filled + extra} bytes of data, its header promises {count}")
    return kept, shape


def _fill(handle: io.BufferedIOBase, view: memoryview) -> int:
    """Read into `view` until it is full or the file ends; the bytes read."""
    filled = 0
    while filled < len(view):
        got = handle.readinto(view[filled:filled + _READ_STEP])
        if not got:
            break
        filled += got
    return filled


def _read_rows(
    handle: io.BufferedIOBase, shape: Tuple[int, ...], rows: torch.Tensor, path: Path,
) -> Tuple[torch.Tensor, int]:
    """The `rows` of an IDX body, read block by block; (those rows, the bytes read)."""
    row_bytes = 1
    for dim in shape[1:]:
        row_bytes *= dim
    if len(rows) and (int(rows[0]) < 0 or int(rows[-1]) >= shape[0] or bool((rows[1:] <= rows[:-1]).any())):
        raise DataNotFound(f"{path}: rows to keep must be ascending indices below {shape[0]}")
    kept = torch.empty((len(rows), *shape[1:]), dtype=torch.uint8)
    flat = kept.view(len(rows), row_bytes)
    per_block = max(1, _READ_STEP // max(row_bytes, 1))
    block = bytearray(per_block * row_bytes)
    ascending = rows.tolist()
    filled = done = 0
    for first in range(0, shape[0], per_block):
        count = min(per_block, shape[0] - first)
        got = _fill(handle, memoryview(block)[:count * row_bytes])
        filled += got
        if got < count * row_bytes:
            break
        upto = bisect.bisect_left(ascending, first + count)
        if upto > done:
            values = torch.frombuffer(block, dtype=torch.uint8, count=count * row_bytes).view(count, row_bytes)
            flat[done:upto] = values[rows[done:upto] - first]
            done = upto
    return kept, filled


def mnist_folders(data_dir: Path) -> Tuple[Path, Path]:
    """Where the IDX files are looked for: the folder itself, then torchvision's layout."""
    return data_dir, data_dir / "MNIST" / "raw"


def find_mnist_file(data_dir: Path, stem: str) -> Optional[Path]:
    """The IDX file `stem` (gzip-compressed or not) in one of `mnist_folders`, or None."""
    for folder in mnist_folders(data_dir):
        for name in (stem, stem + ".gz"):
            if (folder / name).is_file():
                return folder / name
    return None


def missing_mnist_files(data_dir: Path) -> List[str]:
    """The names (as published, .gz) of the four IDX files that `data_dir` lacks; checked
    by presence only, so a launcher can refuse in milliseconds before starting services."""
    stems = [stem for pair in _FILES.values() for stem in pair]
    return [stem + ".gz" for stem in stems if find_mnist_file(data_dir, stem) is None]


def how_to_get_mnist(data_dir: Path, setting: str) -> str:
    """What a person does when the files are missing; `setting` names the knob that
    points elsewhere (a flag, an environment variable or a make variable)."""
    return (
        f"Get the four IDX files ({', '.join(stem + '.gz' for pair in _FILES.values() for stem in pair)}) from "
        f"{MNIST_SOURCES[0]} or torchvision's mirror {MNIST_SOURCES[1]} and put them in {data_dir}, or on a "
        f"connected machine run python -c \"import torchvision; torchvision.datasets.MNIST('{data_dir}', "
        f"download=True)\" and copy the folder over; or point {setting} at a folder that holds them."
    )


def _download(data_dir: Path) -> None:
    from torchvision.datasets import MNIST

    log.info("MNIST not found in %s; trying torchvision's download", data_dir)
    try:
        MNIST(str(data_dir), train=True, download=True)
        MNIST(str(data_dir), train=False, download=True)
    except Exception as exc:  # torchvision raises whatever urllib raised
        log.warning("MNIST download failed: %s", exc)
