"""Dataset registry with fixed, seeded train/val/test splits, adapted to what the model needs.

Images are held as tensors (in memory, or memory-mapped from the decoded cache of an image folder)
and batched by indexing: far faster on 2 cores than a per-sample DataLoader. A split yields
normalised float batches already in the channel count and size the model asked for.
"""

from __future__ import annotations

import gzip
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from . import folders
from .errors import UserError, unknown

SPLIT_SEED = 0  # the split never changes with the training seed: results stay comparable
FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist
IMAGEFOLDER_PREFIX = "imagefolder:"


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    summary: str
    channels: int
    size: int
    num_classes: int
    epochs: int  # dense-training epochs that reach the documented accuracy
    augment: bool = False  # `augmented` batches while training the dense baseline (natural images only)


DATASETS = {
    d.name: d
    for d in [
        DatasetInfo("digits", "scikit-learn's 8x8 digits, embedded, no download (default)", 1, 8, 10, 20),
        DatasetInfo("mnist", "MNIST 28x28 handwritten digits (torchvision files)", 1, 28, 10, 10),
        DatasetInfo("fashion-mnist", "Fashion-MNIST 28x28 (Debian's dataset-fashion-mnist or torchvision)", 1, 28, 10, 15),
        DatasetInfo("cifar10", "CIFAR-10 32x32 colour, 10 classes (torchvision files)", 3, 32, 10, 160, augment=True),
        DatasetInfo("cifar100", "CIFAR-100 32x32 colour, 100 classes (torchvision files)", 3, 32, 100, 160, augment=True),
    ]
}
IMAGEFOLDER_SIZE = 224


@dataclass
class Split:
    """The images at `index` of a pool (uint8 0..255 or float 0..1; the splits of a dataset share
    it, so a memory-mapped pool is never copied), normalised and adapted per batch."""

    x: Tensor
    y: Tensor
    index: Tensor
    mean: Tensor
    std: Tensor
    channels: int
    size: int

    def __len__(self) -> int:
        return len(self.index)

    @property
    def labels(self) -> Tensor:
        return self.y[self.index]

    def subset(self, fraction: float) -> Split:
        """A fixed `fraction` of this split, stratified by label and seeded by SPLIT_SEED alone: the
        same images for every trial, worker and training seed, so trials compare."""
        if not 0 < fraction <= 1:
            raise UserError(f"a subset must be a fraction in (0, 1], got {fraction}")
        if fraction == 1 or round(fraction * len(self)) >= len(self):
            return self
        keep = max(1, round(fraction * len(self)))
        kept, _ = _stratified(self.labels, [keep / len(self), 1 - keep / len(self)])
        return replace(self, index=self.index[kept])

    def sized(self, images: int) -> Split:
        """A fixed stratified subset of about `images` images (`subset`), or all if there are fewer."""
        return self.subset(min(1.0, images / max(len(self), 1)))

    def batches(self, batch_size: int, shuffle: bool = False, generator: torch.Generator | None = None,
                augment: bool = False) -> Iterator[tuple[Tensor, Tensor]]:
        order = torch.randperm(len(self), generator=generator) if shuffle else torch.arange(len(self))
        for start in range(0, len(self), batch_size):
            idx = self.index[order[start : start + batch_size]]
            x = self.x[idx]
            x = x.float() / 255 if x.dtype == torch.uint8 else x.float()
            x = (x - self.mean) / self.std
            if augment:
                x = augmented(x, generator)
            yield self._adapt(x), self.y[idx]

    def _adapt(self, x: Tensor) -> Tensor:
        if x.shape[1] != self.channels:
            x = x.expand(-1, self.channels, -1, -1)  # grey -> RGB for models that want colour
        if x.shape[-1] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return x.contiguous()


def augmented(x: Tensor, generator: torch.Generator | None) -> Tensor:
    """Torchvision's standard training augmentation for the image's size, then a random horizontal
    flip: CIFAR's random crop from a 4-px zero-padded image below 64 px, ImageNet's random resized
    crop (8-100% of the area, aspect 3:4 to 4:3) from 64 px up."""
    x = _padded_crop(x, generator) if x.shape[-1] < 64 else _resized_crop(x, generator)
    flip = torch.rand(len(x), generator=generator) < 0.5
    x[flip] = x[flip].flip(-1)
    return x


def _padded_crop(x: Tensor, generator: torch.Generator | None, pad: int = 4) -> Tensor:
    n, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    dy, dx = torch.randint(0, 2 * pad + 1, (2, n), generator=generator)
    rows = (torch.arange(h) + dy[:, None])[:, None, :, None]
    cols = (torch.arange(w) + dx[:, None])[:, None, None, :]
    return padded[torch.arange(n)[:, None, None, None], torch.arange(x.shape[1])[None, :, None, None], rows, cols]


def _resized_crop(x: Tensor, generator: torch.Generator | None, scale: tuple[float, float] = (0.08, 1.0),
                  ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> Tensor:
    """A random box per image (area fraction in `scale`, aspect in `ratio`, clipped to the image)
    resampled bilinearly to the full size, all in one batched grid_sample."""
    n = len(x)
    area = torch.empty(n).uniform_(*scale, generator=generator)
    aspect = torch.empty(n).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator).exp()
    w, h = (area * aspect).sqrt().clamp(max=1), (area / aspect).sqrt().clamp(max=1)  # fractions of the side
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1] = w, h
    theta[:, 0, 2] = (2 * torch.rand(n, generator=generator) - 1) * (1 - w)  # box centre, in [-1, 1] units
    theta[:, 1, 2] = (2 * torch.rand(n, generator=generator) - 1) * (1 - h)
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


@dataclass
class Data:
    """A dataset loaded for one model: three disjoint splits and the input shape they yield."""

    info: DatasetInfo
    train: Split
    val: Split
    test: Split
    channels: int
    size: int
    source: str = ""

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.size, self.size)

    def describe(self) -> dict[str, object]:
        """The split as stored in checkpoint sidecars, enough to reproduce it."""
        return {
            "dataset": self.info.name,
            "source": self.source,
            "split_seed": SPLIT_SEED,
            "sizes": {"train": len(self.train), "val": len(self.val), "test": len(self.test)},
            "input_shape": list(self.input_shape),
        }


# --- loading --------------------------------------------------------------------------------------


def names() -> list[str]:
    return list(DATASETS) + [IMAGEFOLDER_PREFIX + "PATH"]


def info(name: str) -> DatasetInfo:
    """Registry entry for `name`; unknown names get close matches."""
    if name.startswith(IMAGEFOLDER_PREFIX):
        path = Path(name[len(IMAGEFOLDER_PREFIX) :])
        root = path / "train" if (path / "train").is_dir() else path
        return DatasetInfo(name, f"image folder {path}", 3, IMAGEFOLDER_SIZE, len(folders.classes(root)), 30, True)
    if name not in DATASETS:
        raise unknown("dataset", name, DATASETS, "run `sparsesearch datasets` for the list, or use imagefolder:PATH")
    return DATASETS[name]


def load(name: str = "digits", data_dir: Path | None = None, download: bool = False,
         channels: int | None = None, min_size: int = 1, image_size: int | None = None) -> Data:
    """Load `name` split into train/val/test, yielding `channels` x max(size, min_size) batches.

    `channels=None` keeps the data's own; grey data is repeated to 3 channels for RGB models.
    """
    meta = info(name)
    channels = channels or meta.channels
    if channels not in (meta.channels, 3):
        raise UserError(f"dataset '{name}' has {meta.channels}-channel images; the model wants {channels}")
    size = max(image_size or meta.size, min_size)
    if name.startswith(IMAGEFOLDER_PREFIX):
        return _load_folder(meta, Path(name[len(IMAGEFOLDER_PREFIX) :]), size)
    if name == "digits":
        x, y, source = _digits()
        train_idx, val_idx, test_idx = _stratified(y, [0.6, 0.2, 0.2])
        pools = {"train": (x, y, train_idx), "val": (x, y, val_idx), "test": (x, y, test_idx)}
    else:
        (xtr, ytr), (xte, yte), source = _torchvision_arrays(name, data_dir, download)
        train_idx, val_idx = _stratified(ytr, [0.9, 0.1])
        pools = {"train": (xtr, ytr, train_idx), "val": (xtr, ytr, val_idx),
                 "test": (xte, yte, torch.arange(len(yte)))}
    xtrain = pools["train"][0][pools["train"][2]]
    scale = 255.0 if xtrain.dtype == torch.uint8 else 1.0
    mean = (xtrain.float() / scale).mean(dim=(0, 2, 3), keepdim=True)[0]
    std = (xtrain.float() / scale).std(dim=(0, 2, 3), keepdim=True)[0]
    splits = {k: Split(xs, ys, i, mean, std, channels, size) for k, (xs, ys, i) in pools.items()}
    return Data(meta, splits["train"], splits["val"], splits["test"], channels, size, source)


def _stratified(labels: Tensor, fractions: list[float]) -> list[Tensor]:
    """Seeded split of positions into len(fractions) disjoint, sorted index tensors, stratified by
    label where every class has enough samples."""
    from sklearn.model_selection import train_test_split

    rest = np.arange(len(labels))
    parts, remaining = [], 1.0
    for frac in fractions[:-1]:
        try:
            take, rest = train_test_split(rest, train_size=frac / remaining, random_state=SPLIT_SEED,
                                          stratify=labels.numpy()[rest])
        except ValueError:  # too few samples per class to stratify: a plain seeded split still works
            take, rest = train_test_split(rest, train_size=frac / remaining, random_state=SPLIT_SEED)
        parts.append(take)
        remaining -= frac
    parts.append(rest)
    return [torch.from_numpy(np.sort(p)) for p in parts]


def _digits() -> tuple[Tensor, Tensor, str]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    return x, torch.tensor(bunch.target, dtype=torch.int64), "sklearn.datasets.load_digits"


# --- torchvision-format files ---------------------------------------------------------------------

_TV_CLASS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST", "cifar10": "CIFAR10", "cifar100": "CIFAR100"}


def default_data_dir(name: str) -> Path:
    if name == "fashion-mnist" and FASHION_MNIST_SYSTEM_DIR.is_dir():
        return FASHION_MNIST_SYSTEM_DIR
    return Path(os.environ.get("SPARSESEARCH_DATA", "data"))


def _torchvision_arrays(name: str, data_dir: Path | None, download: bool):  # noqa: ANN202
    root = Path(data_dir) if data_dir is not None else default_data_dir(name)
    if download:
        import torchvision.datasets as tvd

        for train in (True, False):
            getattr(tvd, _TV_CLASS[name])(root=str(root), train=train, download=True)
    elif not root.is_dir():
        raise UserError(f"data directory {root} does not exist; pass --data-dir where {name} lives, "
                        f"or --download on a machine with network" + _apt_hint(name))
    if name.startswith("cifar"):
        return _cifar(name, root) + (str(root),)
    return _idx_pair(name, root, "train"), _idx_pair(name, root, "t10k"), str(root)


def _apt_hint(name: str) -> str:
    return " (Debian: apt-get install dataset-fashion-mnist)" if name == "fashion-mnist" else ""


def _idx_pair(name: str, root: Path, prefix: str) -> tuple[Tensor, Tensor]:
    images = _read_idx(_find_idx(name, root, f"{prefix}-images-idx3-ubyte"))
    labels = _read_idx(_find_idx(name, root, f"{prefix}-labels-idx1-ubyte"))
    if len(images) != len(labels):
        raise UserError(f"{name} in {root}: {len(images)} images but {len(labels)} labels; re-download the data")
    return torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


def _find_idx(name: str, root: Path, stem: str) -> Path:
    """IDX files as Debian ships them (gz in the dir) or as torchvision leaves them (CLASS/raw/)."""
    for folder in (root, root / "raw", root / _TV_CLASS[name] / "raw"):
        for candidate in (folder / stem, folder / f"{stem}.gz"):
            if candidate.is_file():
                return candidate
    raise UserError(f"{name} not found in {root} (no {stem}[.gz]); pass --data-dir where it lives, "
                    "or --download on a machine with network" + _apt_hint(name))


def _read_idx(path: Path) -> np.ndarray:
    """Parse an IDX file (the MNIST format): magic, dims, then unsigned bytes."""
    raw = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
    try:
        if raw[:2] != b"\x00\x00" or raw[2] != 0x08:
            raise ValueError("bad magic number")
        ndim = raw[3]
        dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
        return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)
    except (ValueError, IndexError) as e:
        raise UserError(f"{path} is not a valid IDX file ({e}); re-download the data") from e


_CIFAR_FILES = {  # folder, training batches, test batch, label key: the "python version" torchvision downloads
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], "test_batch", "labels"),
    "cifar100": ("cifar-100-python", ["train"], "test", "fine_labels"),
}


def _cifar(name: str, root: Path) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """Read CIFAR's pickled batches directly, so any copy of the files works offline (torchvision's
    class insists on its own md5 sums)."""
    folder, train_files, test_file, label_key = _CIFAR_FILES[name]
    return _cifar_batches(root / folder, train_files, label_key), _cifar_batches(root / folder, [test_file], label_key)


def _cifar_batches(folder: Path, files: list[str], label_key: str) -> tuple[Tensor, Tensor]:
    import pickle

    images, labels = [], []
    for file in files:
        path = folder / file
        if not path.is_file():
            raise UserError(f"{path} not found; pass --data-dir where {folder.name}/ lives, "
                            "or --download on a machine with network")
        try:
            with open(path, "rb") as f:
                batch = pickle.load(f, encoding="latin1")
            images.append(torch.from_numpy(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)))
            labels.append(torch.tensor(batch[label_key], dtype=torch.int64))
        except (pickle.UnpicklingError, EOFError, KeyError, ValueError, TypeError) as e:
            raise UserError(f"{path} is not a CIFAR batch ({e!r}); re-download the data") from e
    return torch.cat(images), torch.cat(labels)


# --- image folders --------------------------------------------------------------------------------

_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # what pretrained weights expect


def _load_folder(meta: DatasetInfo, path: Path, size: int) -> Data:
    """PATH/train + PATH/val|test when present (10% of train/ held out as validation, stratified,
    seeded; val|test/ is the test split), else PATH/CLASS/* split 80/10/10 the same way."""
    if (path / "train").is_dir():
        held_dir = next((path / d for d in ("val", "test") if (path / d).is_dir()), None)
        if held_dir is None:
            raise UserError(f"{path}/train exists but no val/ or test/ beside it; add one or flatten the folder")
        if folders.classes(held_dir) != folders.classes(path / "train"):
            raise UserError(f"{held_dir} and {path / 'train'} hold different class folders; give both the same classes")
        train, held = folders.Folder.scan(path / "train"), folders.Folder.scan(held_dir)
        parts = [(train, i) for i in _stratified(train.labels, [0.9, 0.1])] + [(held, torch.arange(len(held.files)))]
    else:
        everything = folders.Folder.scan(path)
        parts = [(everything, i) for i in _stratified(everything.labels, [0.8, 0.1, 0.1])]
    pools = {folder.root: folders.images(folder, size) for folder, _ in parts}
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in (_IMAGENET_MEAN, _IMAGENET_STD))
    splits = [Split(pools[f.root], f.labels, i, mean, std, 3, size) for f, i in parts]
    return Data(meta, *splits, channels=3, size=size, source=str(path))
