"""Image folders as users keep them (`ROOT/CLASS/*.jpg`), decoded once into a uint8 cache.

Decoding JPEGs costs more than training a small net on them, and a search loads its data once per
trial. So the first load decodes every image at the model's side into one memory-mapped array,
keyed by the file list, sizes and modification times; every later load maps it in seconds and
reads only the pages it touches. A changed folder gets a new key (the old file is removed); a
cache that cannot be written costs one notice and a decode in memory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .errors import UserError
from .files import save_with

log = logging.getLogger(__name__)
CACHE_ENV = "SPARSESEARCH_CACHE"
_FORMAT = 1  # part of the key: a new decoding recipe never reads an old cache


def cache_dir() -> Path:
    """$SPARSESEARCH_CACHE, else the user's cache folder: never inside the data folder, where a
    hidden sub-folder would read as one more class."""
    if env := os.environ.get(CACHE_ENV):
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sparsesearch" / "images"


def classes(root: Path) -> list[str]:
    """The class sub-folders of `root`, sorted (their order is the label)."""
    if not root.is_dir():
        raise UserError(f"image folder {root} does not exist; pass imagefolder:PATH with one sub-folder per class")
    found = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if len(found) < 2:
        raise UserError(f"image folder {root} needs one sub-folder per class (found {len(found)})")
    return found


@dataclass(frozen=True)
class Folder:
    """The images under one class-per-sub-folder root, in a fixed order, with their labels."""

    root: Path
    files: tuple[Path, ...]
    labels: Tensor

    @classmethod
    def scan(cls, root: Path) -> Folder:
        from torchvision.datasets.folder import IMG_EXTENSIONS

        files, labels = [], []
        for label, name in enumerate(classes(root)):
            found = sorted(p for p in (root / name).rglob("*") if p.suffix.lower() in IMG_EXTENSIONS and p.is_file())
            files += found
            labels += [label] * len(found)
        if not files:
            raise UserError(f"image folder {root} holds no images ({', '.join(sorted(IMG_EXTENSIONS))})")
        return cls(root, tuple(files), torch.tensor(labels, dtype=torch.int64))

    def key(self, side: int) -> str:
        """What the decoded array depends on: the recipe, the side, and each file's path, size
        and modification time (a re-saved or replaced image changes it)."""
        digest = hashlib.sha256(json.dumps([_FORMAT, side]).encode())
        for path in self.files:
            st = path.stat()
            digest.update(f"{path.relative_to(self.root)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return digest.hexdigest()[:20]


def images(folder: Folder, side: int) -> Tensor:
    """Every image of `folder` as uint8 RGB, N x 3 x side x side, from the cache when it is there."""
    stem = f"{folder.root.name}-{hashlib.sha256(str(folder.root.resolve()).encode()).hexdigest()[:8]}-{side}px-"
    path = cache_dir() / f"{stem}{folder.key(side)}.npy"
    shape = (len(folder.files), 3, side, side)
    if path.is_file():
        try:
            array = np.load(path, mmap_mode="c")  # copy-on-write: writable for torch, never written back
            if array.shape == shape and array.dtype == np.uint8:
                return torch.from_numpy(array)
        except (OSError, ValueError) as e:
            log.warning("image cache %s is unreadable (%s); decoding again", path, e)
    try:
        save_with(path, lambda tmp: _decode_into(folder, side, _preallocated(tmp, shape)))
    except OSError as e:
        log.warning("cannot write the image cache %s (%s); decoding in memory this time. Set %s to a "
                    "writable folder to decode once", path, e.strerror or e, CACHE_ENV)
        return torch.from_numpy(_decode_into(folder, side, np.empty(shape, dtype=np.uint8)))
    for stale in path.parent.glob(f"{stem}*.npy"):
        if stale != path:
            stale.unlink(missing_ok=True)  # the same folder before it changed
    return torch.from_numpy(np.load(path, mmap_mode="c"))


def _preallocated(path: Path, shape: tuple[int, ...]) -> np.memmap:
    """A .npy memmap whose blocks are reserved now: a full disk is an OSError here, not a SIGBUS
    when a page of the mapping is first written."""
    array = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=shape)
    with open(path, "rb+") as f:
        os.posix_fallocate(f.fileno(), 0, os.path.getsize(path))
    return array


class _Decoded(torch.utils.data.Dataset):
    def __init__(self, files: tuple[Path, ...], side: int) -> None:
        self.files, self.side = files, side

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[Tensor, str]:
        """The image, and why it could not be read ("" if it could): an exception raised in a
        worker process would come back as a traceback, not as one line."""
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(self.files[i]) as img:
                # what torchvision's Resize((side, side)) does to a PIL image: bilinear, antialiased
                rgb = img.convert("RGB").resize((self.side, self.side), Image.BILINEAR)
        except (OSError, UnidentifiedImageError, ValueError) as e:
            return torch.zeros(3, self.side, self.side, dtype=torch.uint8), f"cannot decode {self.files[i]} ({e})"
        return torch.from_numpy(np.asarray(rgb).transpose(2, 0, 1).copy()), ""


def _decode_into(folder: Folder, side: int, out: np.ndarray) -> np.ndarray:
    """Decode every image into `out` (in file order), with worker processes for large folders,
    logging progress with an ETA about every 10% or 30 s."""
    from torch.utils.data import DataLoader

    n = len(folder.files)
    workers = min(4, len(os.sched_getaffinity(0))) if n > 2000 else 0
    loader = DataLoader(_Decoded(folder.files, side), batch_size=256, num_workers=workers)
    start = last = time.monotonic()
    log.info("decoding %d images of %s at %d px (once: later runs read the cache)", n, folder.root, side)
    done = 0
    for batch, problems in loader:
        if problem := next((p for p in problems if p), None):
            raise UserError(f"{problem}; remove or convert the file")
        out[done : done + len(batch)] = batch.numpy()
        done += len(batch)
        now = time.monotonic()
        if done < n and (now - last >= 30 or done * 10 // n > (done - len(batch)) * 10 // n):
            last = now
            log.info("decoded %d/%d images, ETA %.0f s", done, n, (now - start) * (n - done) / done)
    if isinstance(out, np.memmap):
        out.flush()
    log.info("decoded %d images in %.1f s", n, time.monotonic() - start)
    return out
