"""What an image folder costs to load: Fashion-MNIST written out as 70,000 JPEGs (train/ + test/,
one sub-folder per class), loaded at 32 px the first time (decoded into the cache), the second
time (cache mapped), and one epoch of training batches read from the cache beside the same epoch
decoded from the files by torchvision's ImageFolder through a DataLoader (what every run paid
before the cache).

    taskset -c 1 python bench/imagefolder.py [--workers 1]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

from common import record
from sparsesearch import data

SIDE = 32


def _write_jpegs(root: Path) -> int:
    from PIL import Image

    fashion = data.load("fashion-mnist")
    n = 0
    for split, part in (("train", [fashion.train, fashion.val]), ("test", [fashion.test])):
        for s in part:
            for i, label in zip(s.index.tolist(), s.labels.tolist()):
                folder = root / split / f"class{label}"
                folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray(s.x[i, 0].numpy()).save(folder / f"{i}.jpg", quality=95)
                n += 1
    return n


def _seconds(fn) -> float:  # noqa: ANN001
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _epoch_from_cache(ds: data.Data) -> None:
    for _ in ds.train.batches(128, True, torch.Generator().manual_seed(0), augment=True):
        pass


def _epoch_decoded(root: Path, workers: int) -> None:
    import torchvision.transforms as T
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder

    tf = T.Compose([T.Resize((SIDE, SIDE)), T.ToTensor(), T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    for _ in DataLoader(ImageFolder(str(root / "train"), transform=tf), batch_size=128, shuffle=True,
                        num_workers=workers):
        pass


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workers", type=int, default=min(4, len(os.sched_getaffinity(0))))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root, cache = Path(tmp) / "fashion-jpeg", Path(tmp) / "cache"
        os.environ["SPARSESEARCH_CACHE"] = str(cache)
        images = _write_jpegs(root)
        name = f"imagefolder:{root}"
        first = _seconds(lambda: data.load(name, image_size=SIDE))
        second = _seconds(lambda: data.load(name, image_size=SIDE))
        ds = data.load(name, image_size=SIDE)
        rows = [
            {"what": "first load: scan, decode every image, write the cache", "seconds": first},
            {"what": "second load: scan, map the cache", "seconds": second},
            {"what": f"one training epoch ({len(ds.train)} images) read from the cache, augmented", "seconds":
             _seconds(lambda: _epoch_from_cache(ds))},
            {"what": f"the same epoch decoded by ImageFolder + DataLoader ({args.workers} workers)",
             "seconds": _seconds(lambda: _epoch_decoded(root, args.workers))},
        ]
        cache_mb = sum(p.stat().st_size for p in cache.glob("*.npy")) / 2**20
    print(record("imagefolder", rows, f"{images} JPEGs of Fashion-MNIST (28 px, grey) in train/ + test/ class "
                 f"folders, loaded at {SIDE} px as RGB; cache {cache_mb:.0f} MB; {torch.get_num_threads()} "
                 f"torch threads, {len(os.sched_getaffinity(0))} CPUs usable.").read_text())


if __name__ == "__main__":
    main()
