"""The image-folder task on tiny folders written here: its options, its class list,
its order (file name, then class), its values and training against the mnist task on
the same pixels, partitions, and the errors a person meets. Also the tool that writes
MNIST out as class folders."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Dict, Iterable, List, Tuple

import pytest
import torch
from PIL import Image

from jetfed.config import TrainConfig
from jetfed.errors import DataNotFound, InvalidConfig
from jetfed.partitions import Partition
from jetfed.tasks.base import TaskSettings
from jetfed.tasks.image_folder import ImageFolderTask
from jetfed.tasks.mnist import MnistTask
from jetfed.tasks.registry import task_class
from jetfed.training import train_round

ROOT = Path(__file__).resolve().parents[2]
CPU = torch.device("cpu")
DIGITS = ",".join(str(d) for d in range(10))
AS_MNIST = {"image_size": "28", "channels": "1", "mean": "0.1307", "std": "0.3081", "classes": DIGITS}


def load_tool():
    spec = importlib.util.spec_from_file_location("mnist_to_imagefolder", ROOT / "tools" / "mnist_to_imagefolder.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses and the process pool look it up by name
    spec.loader.exec_module(module)
    return module


TOOL = load_tool()


def task(folder: Path, model: str = "mnist-cnn", **options: str) -> ImageFolderTask:
    return ImageFolderTask(TaskSettings(folder, CPU, model, options))


def png(path: Path, value: int = 0, size: Tuple[int, int] = (28, 28), mode: str = "L") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    color = value if mode == "L" else (value, 255 - value, value // 2)
    Image.new(mode, size, color).save(path)
    return path


def folder_of(root: Path, files: Iterable[str]) -> Path:
    for number, name in enumerate(files):
        png(root / name, value=10 * number)
    return root


def all_batches(data, size: int = 1000) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    return list(data.batches(torch.arange(len(data)).split(size)))


@pytest.fixture(scope="module")
def boards(tiny_mnist: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny MNIST as the tool writes it: alice 0-3, bob 4-6, charlie 7-9, evaluator."""
    out = tmp_path_factory.mktemp("boards")
    assert TOOL.main(["--data-dir", str(tiny_mnist), "--out", str(out), "--jobs", "1"]) == 0
    return out


def test_the_registry_finds_it() -> None:
    assert task_class("image-folder") is ImageFolderTask


@pytest.mark.parametrize("options, words", [
    ({"image_size": "0"}, ["image_size=0", "1..4096"]),
    ({"image_size": "big"}, ["image_size=big"]),
    ({"channels": "2"}, ["channels=2", "1 (grayscale) or 3"]),
    ({"channels": "1", "mean": "0.1,0.2"}, ["mean=0.1,0.2", "2 values for 1 channels"]),
    ({"std": "0.2,0.2"}, ["std=0.2,0.2", "2 values for 3 channels"]),
    ({"std": "0"}, ["std=0", "above 0"]),
    ({"mean": "nan"}, ["mean=nan", "finite"]),
    ({"classes": "cat,,dog"}, ["classes=cat,,dog", "empty class name"]),
    ({"classes": "cat,dog,cat"}, ["cat named twice"]),
    ({"loader_workers": "-1"}, ["loader_workers=-1", "0"]),
    ({"extensions": ","}, ["extensions=,", "at least one"]),
    ({"size": "28"}, ["no option size", "image_size"]),
])
def test_bad_options_are_refused_naming_them(tmp_path: Path, options: Dict[str, str], words: List[str]) -> None:
    with pytest.raises(InvalidConfig) as caught:
        task(tmp_path, **options)
    assert all(word in str(caught.value) for word in words), str(caught.value)


def test_normalisation_defaults_follow_the_channels(tmp_path: Path) -> None:
    rgb, gray = task(tmp_path), task(tmp_path, channels="1")
    assert rgb.mean == (0.485, 0.456, 0.406) and rgb.std == (0.229, 0.224, 0.225)
    assert gray.mean == (0.5,) and gray.std == (0.5,)
    assert task(tmp_path, mean="0.2").mean == (0.2, 0.2, 0.2)


def test_default_classes_are_the_sorted_folders_of_every_split(tmp_path: Path) -> None:
    folder_of(tmp_path, ["train/dog/1.png", "train/cat/1.png", "test/bird/1.png", "test/cat/2.png"])
    (tmp_path / "train" / ".cache").mkdir()
    found = task(tmp_path)
    assert found.classes == ["bird", "cat", "dog"]
    train = found.load("train", Partition())
    assert train.targets.tolist() == [1, 2]  # cat/1.png, dog/1.png: bird holds nothing here


def test_a_folder_without_split_folders_is_the_split(tmp_path: Path) -> None:
    folder_of(tmp_path, ["b/1.png", "a/1.png"])
    found = task(tmp_path)
    assert found.classes == ["a", "b"]
    assert len(found.load("train", Partition())) == 2
    assert len(found.load("test", Partition())) == 2


def test_a_missing_split_folder_is_named(tmp_path: Path) -> None:
    folder_of(tmp_path, ["train/a/1.png"])
    with pytest.raises(DataNotFound, match=r"no test/; add .*test"):
        task(tmp_path).load("test", Partition())


def test_samples_are_ordered_by_file_name_then_class(tmp_path: Path) -> None:
    folder_of(tmp_path, ["b/002.png", "a/003.png", "b/001.png", "a/001.png", "c/002.png"])
    data = task(tmp_path).load("train", Partition())
    assert [Path(p).relative_to(tmp_path).as_posix() for p in data.images.paths] == [
        "a/001.png", "b/001.png", "b/002.png", "c/002.png", "a/003.png"]
    assert data.targets.tolist() == [0, 1, 1, 2, 0]


def test_a_board_without_some_classes_trains_with_the_explicit_list(boards: Path) -> None:
    alice = task(boards / "alice", **AS_MNIST)
    data = alice.load("train", Partition())
    counts = data.label_counts(10)
    assert all(counts[d] > 0 for d in range(4)) and counts[4:] == [0] * 6
    assert alice.classes == [str(d) for d in range(10)]
    model = alice.build_model()
    outcome = train_round(model, data, TrainConfig(batch_size=32, max_batches=3), seed=1)
    assert outcome.num_examples == 96 and outcome.mean_loss > 0


def test_a_folder_outside_the_explicit_list_is_refused(tmp_path: Path) -> None:
    folder_of(tmp_path, ["train/cat/1.png", "train/dog/1.png", "train/fox/1.png"])
    with pytest.raises(InvalidConfig) as caught:
        task(tmp_path, classes="cat,dog").load("train", Partition())
    message = str(caught.value)
    assert "fox" in message and "--option classes" in message and "move them" in message


def test_without_a_list_a_board_uses_its_own_folders(boards: Path) -> None:
    assert task(boards / "bob", channels="1").classes == ["4", "5", "6"]


def test_the_same_examples_and_values_as_the_mnist_task(boards: Path, tiny_mnist: Path) -> None:
    """Same pixels in the same order: equal targets and equal input tensors."""
    mnist = MnistTask(TaskSettings(tiny_mnist, CPU, None, {}, download=False))
    for board, labels, split in (("alice", {0, 1, 2, 3}, "train"), ("charlie", {7, 8, 9}, "train"),
                                 ("evaluator", None, "test")):
        theirs = mnist.load(split, Partition(labels=frozenset(labels)) if labels else Partition())
        ours = task(boards / board, **AS_MNIST).load(split, Partition())
        assert torch.equal(ours.targets, theirs.targets), board
        for (a, a_labels), (b, b_labels) in zip(all_batches(ours), all_batches(theirs)):
            assert torch.equal(a_labels, b_labels)
            assert a.dtype == b.dtype and a.shape == b.shape
            assert (a - b).abs().max() <= 1e-6, board


def test_training_matches_the_mnist_task_step_for_step(boards: Path, tiny_mnist: Path) -> None:
    mnist = MnistTask(TaskSettings(tiny_mnist, CPU, None, {}, download=False))
    ours = task(boards / "bob", **AS_MNIST)
    states = []
    for each, data in ((mnist, mnist.load("train", Partition(labels=frozenset({4, 5, 6})))),
                       (ours, ours.load("train", Partition()))):
        torch.manual_seed(1)
        model = each.build_model()
        states.append(train_round(model, data, TrainConfig(lr=0.1, batch_size=32, max_batches=5), seed=7).state)
    assert all(torch.allclose(states[0][k], states[1][k], atol=1e-6) for k in states[0])


def test_a_partition_keeps_its_share_in_order(boards: Path) -> None:
    evaluator = task(boards / "evaluator", **AS_MNIST)
    everything = evaluator.load("test", Partition())
    kept = evaluator.load("test", Partition(labels=frozenset({1, 2})))
    expected = [p for p, t in zip(everything.images.paths, everything.targets.tolist()) if t in (1, 2)]
    assert kept.images.paths == expected and len(expected) > 0
    assert set(kept.targets.tolist()) == {1, 2}
    halves = [evaluator.load("test", Partition(shard=(i, 2), seed=5)).images.paths for i in (1, 2)]
    assert sorted(halves[0] + halves[1]) == sorted(everything.images.paths)
    assert not set(halves[0]) & set(halves[1]) and abs(len(halves[0]) - len(halves[1])) <= 1


def test_resized_and_converted_to_the_settings(tmp_path: Path) -> None:
    png(tmp_path / "a" / "1.png", 200, size=(40, 30), mode="RGB")
    png(tmp_path / "b" / "1.jpg", 10, size=(16, 16), mode="L")
    png(tmp_path / "b" / "2.JPG", 20, size=(16, 16), mode="L")
    (tmp_path / "b" / "notes.txt").write_text("not an image")
    rgb = task(tmp_path, image_size="16")
    data = rgb.load("train", Partition())
    (inputs, labels), = all_batches(data)
    assert inputs.shape == (3, 3, 16, 16) and labels.tolist() == [1, 0, 1]  # 1.jpg, 1.png, 2.JPG
    assert rgb.example_input(2).shape == (2, 3, 16, 16)
    assert rgb.build_model()(inputs).shape == (3, 2)
    gray = task(tmp_path, image_size="16", channels="1", mean="0", std="1")
    (inputs, _), = all_batches(gray.load("train", Partition()))
    assert inputs.shape == (3, 1, 16, 16)
    assert inputs[0].max().item() == pytest.approx(10 / 255) and inputs[0].min().item() == pytest.approx(10 / 255)


def test_an_empty_split_is_named(tmp_path: Path) -> None:
    (tmp_path / "cat").mkdir()
    (tmp_path / "cat" / "readme.txt").write_text("no images yet")
    with pytest.raises(DataNotFound, match=f"no images .* in the class folders of {tmp_path}"):
        task(tmp_path).load("train", Partition())
    with pytest.raises(DataNotFound, match="no class folders in"):
        _ = task(tmp_path / "cat").classes
    with pytest.raises(DataNotFound, match="is not a folder"):
        _ = task(tmp_path / "nowhere").classes


def test_an_unreadable_first_image_is_refused_at_load(tmp_path: Path) -> None:
    bad = tmp_path / "a" / "0.png"
    bad.parent.mkdir()
    bad.write_bytes(b"not a png")
    png(tmp_path / "a" / "1.png")
    with pytest.raises(DataNotFound) as caught:
        task(tmp_path).load("train", Partition())
    assert str(bad) in str(caught.value) and "replace it or remove it" in str(caught.value)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize("workers", ["0", "2"])
def test_a_broken_image_met_in_a_round_fails_it_naming_the_file(tmp_path: Path, workers: str) -> None:
    """With loader processes too: one clean error, not a worker process's traceback;
    the loader then serves the next pass (the worker keeps serving rounds)."""
    folder_of(tmp_path, [f"{d}/{n:03d}.png" for n in range(12) for d in "ab"])
    data = task(tmp_path, image_size="28", loader_workers=workers).load("train", Partition())
    good = all_batches(data, 5)
    broken = tmp_path / "b" / "007.png"
    broken.write_bytes(broken.read_bytes()[:40])  # cut short, as a failing card leaves it
    with pytest.raises(DataNotFound) as caught:
        all_batches(data, 5)
    assert str(broken) in str(caught.value) and "Traceback" not in str(caught.value)
    first = next(data.batches([torch.arange(5)]))
    assert torch.equal(first[0], good[0][0])


def test_loader_processes_give_the_same_batches(boards: Path) -> None:
    order = torch.randperm(200, generator=torch.Generator().manual_seed(3)).split(32)
    inline = task(boards / "evaluator", **AS_MNIST).load("test", Partition())
    pooled = task(boards / "evaluator", **AS_MNIST, loader_workers="2").load("test", Partition())
    for _ in range(2):  # the second pass reuses the persistent loader processes
        for (a, a_labels), (b, b_labels) in zip(inline.batches(order), pooled.batches(order)):
            assert torch.equal(a, b) and torch.equal(a_labels, b_labels)


# The tool.


def test_the_tool_writes_each_board_as_class_folders_named_by_index(boards: Path, tiny_mnist: Path) -> None:
    from jetfed.data import load_mnist

    labels = load_mnist(tiny_mnist, "train", download=False).labels
    alice = sorted(p.relative_to(boards / "alice" / "train").as_posix() for p in (boards / "alice").rglob("*.png"))
    expected = sorted(f"{int(label)}/{i:05d}.png" for i, label in enumerate(labels.tolist()) if label < 4)
    assert alice == expected
    assert sorted(p.name for p in (boards / "evaluator" / "test").iterdir()) == [str(d) for d in range(10)]
    assert sum(1 for _ in (boards / "evaluator").rglob("*.png")) == 200
    with Image.open(boards / "alice" / "train" / expected[0]) as image:
        assert image.mode == "L" and image.size == (28, 28)


def test_the_tool_runs_again_without_rewriting(boards: Path, tiny_mnist: Path, capsys: pytest.CaptureFixture) -> None:
    missing = next((boards / "bob" / "train" / "5").iterdir())
    missing.unlink()
    assert TOOL.main(["--data-dir", str(tiny_mnist), "--out", str(boards), "--jobs", "1"]) == 0
    printed = capsys.readouterr().out
    assert "bob: 1 PNGs written" in printed and "alice: 0 PNGs written" in printed
    assert missing.is_file()


def test_the_tool_writes_one_board_with_everything(tiny_mnist: Path, tmp_path: Path) -> None:
    assert TOOL.main(["--data-dir", str(tiny_mnist), "--out", str(tmp_path), "--boards", "all=all",
                      "--evaluator", "none", "--jobs", "2"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["all"]
    assert sum(1 for _ in tmp_path.rglob("*.png")) == 600


@pytest.mark.parametrize("argv, words", [
    (["--boards", "alice"], ["alice", "NAME=LABELS"]),
    (["--boards", "alice=0-12"], ["outside 0..9"]),
    (["--boards", "a=1", "a=2"], ["a given twice"]),
    (["--boards", "evaluator=1"], ["also a board's name"]),
])
def test_the_tool_refuses_bad_boards(tiny_mnist: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                     argv: List[str], words: List[str]) -> None:
    assert TOOL.main(["--data-dir", str(tiny_mnist), "--out", str(tmp_path), *argv]) == 2
    error = capsys.readouterr().err
    assert all(word in error for word in words) and error.count("\n") == 1, error


def test_the_tool_refuses_a_board_folder_of_other_labels(boards: Path, tiny_mnist: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    assert TOOL.main(["--data-dir", str(tiny_mnist), "--out", str(boards), "--boards", "alice=0-2"]) == 2
    assert "holds 3, which this run would not write" in capsys.readouterr().err


def test_the_tool_names_missing_mnist(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert TOOL.main(["--data-dir", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert "MNIST train files not found" in capsys.readouterr().err
