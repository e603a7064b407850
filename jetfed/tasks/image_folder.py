"""The image-folder task: the layout people already have on disk, one subfolder per
class of JPEG/PNG files (torchvision's ImageFolder), trained with any jetfed or
torchvision classification model.

--data-dir is the board's folder. If it holds `train/` and/or `test/`, a split is read
from its subfolder (workers train on train/, the evaluator scores test/); otherwise the
folder itself is the split, for a board that holds nothing but its own images.

Classes are matched by name across the fleet. With `--option classes=a,b,c` the
indices follow that list: a board without a folder for some class still trains (it
holds 0 of them), and a folder the list does not name is refused. Without it, the
classes are the sorted names of this board's class folders, and the coordinator
refuses a fleet whose lists differ (GetInfo carries them).

Images stay on disk: a DataLoader reads and decodes each batch as the training loop
asks for it (`loader_workers` processes, or the torch thread itself with 0), so a board
with 100,000 images holds their paths, not their pixels. Values equal the mnist task's
for the same 8-bit pixels: ToTensor divides by 255, then Normalize.

loader_workers defaults to 0: no extra processes, the least memory. Measured with the
reference recipe over MNIST PNGs (bench/image_folder.py, a shared 2-core machine
without a GPU, two runs each way): 2 loader processes a service made the mean round
0.26-0.6 s shorter (2.05 vs 2.66 s, 4.29 vs 4.55 s; the evaluator's 40,000 decodes per
evaluated round run beside the scoring), the fleet 26-27 s slower to start, and cost a
fork server plus ~400 MiB RSS (135 MiB PSS) a loader process. Large images on a board
with a GPU are the other way round: a 640x480 JPEG took ~7 ms to decode and resize to
224, 0.2 s of the training thread per batch of 32, so give those 2-4. A
program that builds this task itself (not a jetfed service) needs the usual
`if __name__ == "__main__":` guard when loader_workers > 0, as for any DataLoader
whose processes start by forkserver or spawn."""

from __future__ import annotations

import logging
import multiprocessing
import os
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, cast

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from jetfed.errors import DataNotFound, InvalidConfig
from jetfed.models import build_model
from jetfed.partitions import Partition
from jetfed.tasks.base import Batch, Examples, Option, Task, TaskSettings

log = logging.getLogger(__name__)

SPLITS = ("train", "test")
AUTO = "auto"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
GRAY_MEAN, GRAY_STD = (0.5,), (0.5,)
MAX_IMAGE_SIZE = 4096
OWNER_POLL_S = 1.0
# What every loader process imports; the fork server loads it once for all of them.
PRELOAD = ["torch", "torchvision.transforms", "PIL.Image", "PIL.PngImagePlugin", "PIL.JpegImagePlugin", __name__]


def _image_size(text: str) -> int:
    size = int(text)
    if not 1 <= size <= MAX_IMAGE_SIZE:
        raise ValueError(f"must be 1..{MAX_IMAGE_SIZE} pixels")
    return size


def _channels(text: str) -> int:
    channels = int(text)
    if channels not in (1, 3):
        raise ValueError("must be 1 (grayscale) or 3 (RGB)")
    return channels


def _floats(text: str) -> Optional[Tuple[float, ...]]:
    if text == AUTO:
        return None
    values = tuple(float(part) for part in text.split(","))
    if not all(value == value and abs(value) != float("inf") for value in values):
        raise ValueError("must be finite numbers")
    return values


def _names(text: str) -> Optional[Tuple[str, ...]]:
    if text == AUTO:
        return None
    names = tuple(part.strip() for part in text.split(","))
    if not all(names):
        raise ValueError("an empty class name; write names separated by commas, e.g. cat,dog")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"{', '.join(repeated)} named twice")
    return names


def _workers(text: str) -> int:
    workers = int(text)
    if workers < 0:
        raise ValueError("must be 0 (decode in the training thread) or more")
    return workers


def _extensions(text: str) -> Tuple[str, ...]:
    found = tuple("." + part.strip().lower().lstrip(".") for part in text.split(",") if part.strip())
    if not found:
        raise ValueError("name at least one, e.g. jpg,png")
    return found


class FolderImages(Dataset):
    """Image files and their labels, decoded one by one as asked: in a DataLoader's
    worker processes, or in the torch thread with loader_workers=0. An image comes out
    as uint8 (channels, size, size), resized only when its size differs; scaling and
    normalising wait for the whole batch on the compute device (FolderExamples), a
    quarter of the bytes to move and one vectorised step instead of one per image
    (ToTensor and Normalize per image were 200 of a 28x28 PNG's 350 us).

    A file that cannot be decoded does not raise here: an exception raised in a loader
    process reaches the service as a traceback rewrapped in text. It comes back as a
    blank image with the reason, and FolderExamples.batches raises one clean error that
    names the file."""

    def __init__(self, paths: Sequence[str], labels: torch.Tensor, *, channels: int, image_size: int) -> None:
        from torchvision import transforms

        self.paths = list(paths)
        self.labels = labels
        self.owner = os.getpid()  # the service: loader processes end with it (follow_owner)
        self.mode = "L" if channels == 1 else "RGB"
        self.shape = (channels, image_size, image_size)
        self.size = (image_size, image_size)
        self.resize = transforms.Resize(self.size)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int, str]:
        from torchvision.transforms.functional import pil_to_tensor

        path, label = self.paths[index], int(self.labels[index])
        try:
            image = read_image(path, self.mode)
        except Exception as exc:  # whatever the decoder raised, this file is the fault
            return torch.zeros(self.shape, dtype=torch.uint8), label, unreadable(path, exc)
        if image.size != self.size:
            image = self.resize(image)
        return pil_to_tensor(image), label, ""


def follow_owner(worker_id: int) -> None:
    """A loader process ends within a second of the service that owns it, however that
    ended (SIGKILL and os._exit included). torch's own check watches the loader's
    parent, which is the fork server here, and the fork server waits for its children:
    without this, both would outlive the service for good."""
    import threading
    import time

    from torch.utils.data import get_worker_info

    info = get_worker_info()
    owner = cast(FolderImages, info.dataset).owner if info is not None else os.getppid()  # the loader's dataset

    def watch() -> None:
        while True:
            time.sleep(OWNER_POLL_S)
            try:
                os.kill(owner, 0)
            except (ProcessLookupError, PermissionError):  # gone, or its number taken by someone else's process
                os._exit(0)

    threading.Thread(target=watch, name="follow-owner", daemon=True).start()


def read_image(path: str, mode: str):  # -> PIL.Image.Image (PIL imports lazily)
    """The whole image, decoded and converted to `mode` (L or RGB), its file closed."""
    from PIL import Image

    with Image.open(path) as image:
        return image.convert(mode)


def unreadable(path: str, exc: BaseException) -> str:
    return (f"image-folder: {path} cannot be read as an image ({type(exc).__name__}: {exc}); "
            "replace it or remove it from the folder")


class FolderExamples(Examples):
    """A split's images on disk, batched by a DataLoader in the order the training loop
    gives. The loader and its worker processes live as long as the examples, so a round
    does not pay for starting them; its batch plan is swapped for each pass."""

    def __init__(self, images: FolderImages, device: torch.device, *, mean: Sequence[float], std: Sequence[float],
                 workers: int) -> None:
        self.images = images
        self.mean = list(mean)
        self.std = list(std)
        self.targets = images.labels
        self.device = device
        self.workers = workers
        self._plan = _BatchPlan()
        self._loader: Optional[DataLoader] = None

    def batches(self, indices: Iterable[torch.Tensor]) -> Iterator[Batch]:
        if len(self) == 0:
            return
        loader = self._loader if self._loader is not None else self._make_loader()
        pinned = loader.pin_memory
        self._plan.source = indices
        for inputs, labels, problems in loader:
            for problem in problems:
                if problem:
                    raise DataNotFound(problem)
            inputs = inputs.to(self.device, non_blocking=pinned)
            yield self.normalize(inputs), labels.to(self.device, non_blocking=pinned)

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 pixels to the model's input: torchvision's ToTensor scaling, then its
        Normalize, over the whole batch; the very arithmetic the mnist task does."""
        from torchvision.transforms.functional import normalize

        return normalize(pixels.float().div(255), self.mean, self.std)

    def _make_loader(self) -> DataLoader:
        """Loader processes start by forkserver (spawn where it is missing), never fork:
        a service runs gRPC threads, and a forked copy of a threaded process can hang on
        a lock some thread held at the fork. The fork server imports torch and the
        decoders once and each loader process is forked from it, sharing those pages:
        measured on MNIST PNGs, 394 MiB RSS (135 MiB PSS) a loader process instead of
        688 (393), started in 4.6 s instead of 8.5 s."""
        extra: Dict[str, Any] = {}
        if self.workers:
            context: multiprocessing.context.BaseContext
            if "forkserver" in multiprocessing.get_all_start_methods():
                context = multiprocessing.get_context("forkserver")
                context.set_forkserver_preload(PRELOAD)  # no effect if a fork server already runs
            else:
                context = multiprocessing.get_context("spawn")
            extra = dict(multiprocessing_context=context, persistent_workers=True, worker_init_fn=follow_owner)
        self._loader = DataLoader(self.images, batch_sampler=self._plan, num_workers=self.workers,
                                  pin_memory=self.device.type == "cuda", **extra)
        return self._loader


class _BatchPlan:
    """The DataLoader's batch sampler: the index lists of the pass under way. A loader
    with persistent workers keeps its sampler, so each pass sets `source` first."""

    def __init__(self) -> None:
        self.source: Iterable[torch.Tensor] = ()

    def __iter__(self) -> Iterator[List[int]]:
        for index in self.source:
            yield index.tolist()


class ImageFolderTask(Task):
    """Classification over class folders of images (see the module docstring).

    Samples are ordered by (file name, class name), not class by class as torchvision's
    ImageFolder does. tools/mnist_to_imagefolder.py names each PNG by its index in
    MNIST's IDX file (zero-padded), so this order is the IDX order, the training loop's
    seeded permutation picks the same images as the mnist task's, and a federation over
    those folders learns exactly what the reference learns from the same pixels."""

    name = "image-folder"
    description = ("class folders of JPEG/PNG images in --data-dir (train/ and test/ subfolders, or the folder "
                   "itself), read from disk by a DataLoader")
    default_model = "resnet18"
    options = {
        "image_size": Option("224", "images are resized to this many pixels square", _image_size),
        "channels": Option("3", "1 (grayscale) or 3 (RGB); images are converted", _channels),
        "mean": Option(AUTO, "normalisation means, one per channel or one for all; auto: ImageNet's for 3 "
                             "channels, 0.5 for 1", _floats),
        "std": Option(AUTO, "normalisation standard deviations, as mean; auto: ImageNet's for 3 channels, 0.5 "
                            "for 1", _floats),
        "classes": Option(AUTO, "class names in index order, comma-separated; auto: the sorted class folder "
                                "names of this board", _names),
        "loader_workers": Option("0", "processes decoding images for the DataLoader; 0 decodes in the training "
                                      "thread (best for small images); 2-4 keep a GPU fed with large JPEGs",
                                 _workers),
        "extensions": Option("jpg,jpeg,png", "file endings read as images", _extensions),
    }

    def __init__(self, settings: TaskSettings) -> None:
        super().__init__(settings)
        values = self.option_values
        self.image_size: int = values["image_size"]  # type: ignore[assignment]
        self.channels: int = values["channels"]  # type: ignore[assignment]
        self.mean = self._per_channel("mean", values["mean"], IMAGENET_MEAN if self.channels == 3 else GRAY_MEAN)
        self.std = self._per_channel("std", values["std"], IMAGENET_STD if self.channels == 3 else GRAY_STD)
        if not all(value > 0 for value in self.std):
            raise InvalidConfig(f"--option std={self.settings.options.get('std')}: each standard deviation must be "
                                "above 0")
        self.loader_workers: int = values["loader_workers"]  # type: ignore[assignment]
        self.extensions: Tuple[str, ...] = values["extensions"]  # type: ignore[assignment]
        self._classes: Optional[List[str]] = None

    def _per_channel(self, key: str, given: object, default: Sequence[float]) -> Tuple[float, ...]:
        values = tuple(given) if given is not None else tuple(default)  # type: ignore[arg-type]
        if len(values) == 1:
            return values * self.channels
        if len(values) != self.channels:
            raise InvalidConfig(f"--option {key}={self.settings.options.get(key)}: {len(values)} values for "
                                f"{self.channels} channels; give one per channel or one for all")
        return values

    @property
    def classes(self) -> List[str]:
        if self._classes is None:
            named = self.option_values["classes"]
            self._classes = list(cast(Tuple[str, ...], named)) if named is not None else self._folder_classes()
        return self._classes

    def _folder_classes(self) -> List[str]:
        """The sorted class folder names of every split this board holds: the same list
        whichever split a service loads (a board with train/ and test/ names both)."""
        folders = [self.settings.data_dir / s for s in SPLITS if (self.settings.data_dir / s).is_dir()]
        names = sorted({name for folder in folders or [self._root()] for name in class_folders(folder)})
        if not names:
            where = " and ".join(str(f) for f in folders) if folders else str(self.settings.data_dir)
            raise DataNotFound(f"image-folder: no class folders in {where}; put each class's images in a subfolder "
                               "named for the class (e.g. cat/001.jpg), or point --data-dir at the folder that holds them")
        return names

    def _root(self) -> Path:
        root = self.settings.data_dir
        if not root.is_dir():
            raise DataNotFound(f"image-folder: --data-dir {root} is not a folder; point it at the folder holding "
                               "the class folders (or train/ and test/)")
        return root

    def split_folder(self, split: str) -> Path:
        """data_dir/<split> when the board has split folders, else data_dir itself."""
        root = self._root()
        if any((root / s).is_dir() for s in SPLITS):
            folder = root / split
            if not folder.is_dir():
                raise DataNotFound(f"image-folder: {root} has split folders but no {split}/; add {folder} or point "
                                   f"--data-dir at a folder holding {split}'s class folders")
            return folder
        return root

    def build_model(self) -> nn.Module:
        return build_model(self.model_name, num_classes=len(self.classes), channels=self.channels,
                           image_size=self.image_size)

    def load(self, split: str, partition: Partition) -> Examples:
        folder = self.split_folder(split)
        paths, labels = scan(folder, self.classes, self.extensions, named=self.option_values["classes"] is not None)
        if not paths:
            raise DataNotFound(f"image-folder: no images ({', '.join(self.extensions)}) in the class folders of "
                               f"{folder}; copy the {split} images there, or fix --option extensions")
        check_first(paths[0])
        targets = torch.tensor(labels, dtype=torch.int64)
        if not partition.is_everything():
            keep = partition.indices(targets, len(self.classes))
            paths = [paths[i] for i in keep.tolist()]
            targets = targets[keep]
        images = FolderImages(paths, targets, channels=self.channels, image_size=self.image_size)
        log.info("image-folder split=%s folder=%s images=%d loader_workers=%d", split, folder, len(paths),
                 self.loader_workers)
        return FolderExamples(images, self.settings.device, mean=self.mean, std=self.std, workers=self.loader_workers)

    def example_input(self, batch: int = 1) -> torch.Tensor:
        return torch.zeros(batch, self.channels, self.image_size, self.image_size)


def class_folders(folder: Path) -> List[str]:
    """The class folders' names in `folder` (hidden ones, like .cache, are not classes)."""
    with os.scandir(folder) as entries:
        return sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))


def scan(folder: Path, classes: List[str], extensions: Tuple[str, ...], *, named: bool) -> Tuple[List[str], List[int]]:
    """Image paths and class indices, ordered by (file name, class name). `named`: the
    classes came from --option classes, so a folder outside the list is a mistake."""
    index = {name: number for number, name in enumerate(classes)}
    found = class_folders(folder)
    strangers = [name for name in found if name not in index]
    if strangers:
        where = "--option classes" if named else "the fleet's class list"
        raise InvalidConfig(
            f"image-folder: {folder} has class folders {', '.join(strangers)} that {where} "
            f"({','.join(classes)}) does not name; add them to --option classes (on every board), or move them "
            f"out of {folder}"
        )
    samples: List[Tuple[str, str]] = []
    for name in found:
        with os.scandir(folder / name) as entries:
            samples += [(entry.name, name) for entry in entries
                        if entry.name.lower().endswith(extensions) and not entry.name.startswith(".")]
    samples.sort()
    return [os.path.join(folder, name, file) for file, name in samples], [index[name] for _, name in samples]


def check_first(path: str) -> None:
    """Decode one image at start-up, so a folder of files that are no images (or a
    Pillow without their codec) is refused before the service serves; a file broken
    later fails only the round that meets it."""
    try:
        read_image(path, "L")
    except Exception as exc:
        raise DataNotFound(unreadable(path, exc)) from None
