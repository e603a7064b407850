"""Write MNIST's IDX files out as PNG class folders, one folder per board, the layout
the image-folder task reads (torchvision's ImageFolder): so image-folder runs on real
image files, as a camera pipeline would leave them, and can be held against the mnist
task on the very same pixels.

    python tools/mnist_to_imagefolder.py --data-dir DIR --out OUT [--boards alice=0-3 bob=4-6 charlie=7-9]

writes OUT/<board>/train/<class>/<index>.png for each board's labels and
OUT/evaluator/test/<class>/<index>.png for the test set. `--boards all=all` gives one
board with everything. File names are the image's index in its IDX file, zero-padded,
so image-folder's order (file name, then class) is the IDX order and a federation over
these folders sees the same batches as the mnist task for the same seed.

PNGs are grayscale and lossless. A file is written under a temporary name and renamed
into place, so a file that exists is whole: a second run skips what is there and
writes what is missing. A board folder holding classes or files this run would not
write (e.g. from other --boards) is refused rather than mixed in.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, FrozenSet, List, Optional, Sequence, Tuple

import torch
from PIL import Image

from jetfed.data import load_mnist, parse_labels
from jetfed.errors import InvalidConfig, JetfedError

DEFAULT_BOARDS = ("alice=0-3", "bob=4-6", "charlie=7-9")
EVALUATOR = "evaluator"
CHUNK = 2000  # images per pool task: big enough that the pickling is noise
DIGITS = 5  # 60,000 and 10,000 images: five digits keep the name order the index order


@dataclass(frozen=True)
class Board:
    name: str
    split: str  # "train", or "test" for the evaluator
    labels: FrozenSet[int]


@dataclass(frozen=True)
class Chunk:
    """Images for one pool task: their raw 28x28 bytes, and where each goes."""

    folder: str  # OUT/<board>/<split>
    names: List[Tuple[str, str]]  # (class folder, file name) per image
    pixels: bytes  # len(names) * 28 * 28
    size: Tuple[int, int]


def parse_board(spec: str) -> Board:
    name, sep, labels = spec.partition("=")
    name = name.strip()
    if not sep or not name or not labels.strip():
        raise InvalidConfig(f"--boards {spec!r}: write NAME=LABELS, e.g. alice=0-3 or all=all")
    if name in (".", "..") or "/" in name or os.sep in name:
        raise InvalidConfig(f"--boards {spec!r}: a board's name becomes a folder name; {name!r} cannot be one")
    return Board(name, "train", parse_labels(labels))


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, required=True, help="folder with the four MNIST IDX files")
    parser.add_argument("--out", type=Path, required=True, help="where the board folders go")
    parser.add_argument("--boards", nargs="+", default=list(DEFAULT_BOARDS), metavar="NAME=LABELS",
                        help=f"boards and the labels of their training images (default: {' '.join(DEFAULT_BOARDS)})")
    parser.add_argument("--evaluator", default=EVALUATOR,
                        help=f"the folder that gets the test set (default {EVALUATOR}); 'none' skips it")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="processes encoding PNGs (default: one per core)")
    return parser.parse_args(argv)


def plan(boards: List[Board], evaluator: Optional[str]) -> List[Board]:
    names = [board.name for board in boards]
    duplicated = sorted({name for name in names if names.count(name) > 1})
    if duplicated:
        raise InvalidConfig(f"--boards: {', '.join(duplicated)} given twice")
    if evaluator:
        if evaluator in names:
            raise InvalidConfig(f"--evaluator {evaluator}: also a board's name; pick another (or rename the board)")
        boards = [*boards, Board(evaluator, "test", frozenset(range(10)))]
    return boards


def expected_files(labels: torch.Tensor, keep: FrozenSet[int]) -> Dict[str, List[int]]:
    """Class folder -> the IDX indices it holds, ascending."""
    return {str(label): (labels == label).nonzero().flatten().tolist() for label in sorted(keep)}


def refuse_strangers(folder: Path, files: Dict[str, List[int]]) -> None:
    """A board folder from an earlier run with other labels would mix classes in."""
    if not folder.is_dir():
        return
    strangers = sorted(entry.name for entry in folder.iterdir() if entry.name not in files)
    if strangers:
        raise InvalidConfig(
            f"{folder} holds {', '.join(strangers[:5])}{' ...' if len(strangers) > 5 else ''}, which this run "
            f"would not write (another run's --boards?); remove {folder.parent} or pick another --out"
        )


def chunks_to_write(out: Path, board: Board, images: torch.Tensor, labels: torch.Tensor) -> Tuple[List[Chunk], int]:
    """The images of `board` that are not on disk yet, in chunks; and how many are."""
    folder = out / board.name / board.split
    files = expected_files(labels, board.labels)
    refuse_strangers(folder, files)
    todo: List[Tuple[int, str, str]] = []
    present = 0
    for label, indices in files.items():
        class_folder = folder / label
        class_folder.mkdir(parents=True, exist_ok=True)
        there = {entry.name for entry in os.scandir(class_folder)}
        for index in indices:
            name = f"{index:0{DIGITS}d}.png"
            if name in there:
                present += 1
            else:
                todo.append((index, label, name))
    height, width = images.shape[1:]
    chunks = []
    for start in range(0, len(todo), CHUNK):
        part = todo[start:start + CHUNK]
        pixels = images[torch.tensor([index for index, _, _ in part], dtype=torch.long)].contiguous()
        chunks.append(Chunk(str(folder), [(label, name) for _, label, name in part],
                            pixels.numpy().tobytes(), (width, height)))
    return chunks, present


def write_chunk(chunk: Chunk) -> int:
    """Encode and write one chunk (in a pool process); each file appears whole or not at all."""
    step = chunk.size[0] * chunk.size[1]
    for number, (label, name) in enumerate(chunk.names):
        image = Image.frombytes("L", chunk.size, chunk.pixels[number * step:(number + 1) * step])
        target = os.path.join(chunk.folder, label, name)
        partial = f"{target}.part{os.getpid()}"
        image.save(partial, format="PNG")
        os.replace(partial, target)
    return len(chunk.names)


def convert(args: argparse.Namespace) -> None:
    if args.jobs < 1:
        raise InvalidConfig(f"--jobs: {args.jobs} must be at least 1")
    evaluator = None if args.evaluator == "none" else args.evaluator
    boards = plan([parse_board(spec) for spec in args.boards], evaluator)
    started = time.perf_counter()
    sets = {split: load_mnist(args.data_dir, split, download=False)
            for split in ("train", "test") if any(board.split == split for board in boards)}
    work: List[Tuple[Board, List[Chunk], int]] = []
    for board in boards:
        data = sets[board.split]
        chunks, present = chunks_to_write(args.out, board, data.images, data.labels)
        work.append((board, chunks, present))
    all_chunks = [chunk for _, chunks, _ in work for chunk in chunks]
    if args.jobs == 1 or len(all_chunks) <= 1:
        written = [write_chunk(chunk) for chunk in all_chunks]
    else:
        with ProcessPoolExecutor(max_workers=args.jobs) as pool:
            written = list(pool.map(write_chunk, all_chunks))
    done = iter(written)
    total = 0
    for board, chunks, present in work:
        count = sum(next(done) for _ in chunks)
        total += count
        labels = ",".join(str(label) for label in sorted(board.labels))
        print(f"{board.name}: {count} PNGs written, {present} already there, in {args.out / board.name / board.split} "
              f"(classes {labels})")
    print(f"{total} PNGs written in {time.perf_counter() - started:.1f}s with {args.jobs} processes", flush=True)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        convert(args)
    except (JetfedError, OSError) as exc:
        print(f"mnist_to_imagefolder: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
