from __future__ import annotations

import gzip
from pathlib import Path

import pytest
import torch

from sparsesearch import data
from sparsesearch.errors import UserError


def _index_sets(ds: data.Data) -> list[set[int]]:
    return [set(s.index.tolist()) for s in (ds.train, ds.val, ds.test)]


def test_digits_split_is_disjoint_and_covers_all() -> None:
    train, val, test = _index_sets(data.load("digits"))
    assert not (train & val or train & test or val & test)
    assert len(train | val | test) == 1797


def test_digits_split_is_deterministic_and_stratified() -> None:
    a, b = data.load("digits"), data.load("digits")
    for sa, sb in zip((a.train, a.val, a.test), (b.train, b.val, b.test)):
        assert torch.equal(sa.index, sb.index)
    counts = torch.bincount(a.test.y, minlength=10)
    assert counts.min() >= 34 and counts.max() <= 38  # 20% of ~180 per class


def test_train_batches_are_normalised() -> None:
    ds = data.load("digits")
    x = torch.cat([xb for xb, _ in ds.train.batches(256)])
    assert abs(x.mean().item()) < 1e-4 and abs(x.std().item() - 1) < 1e-2


def test_shuffled_batches_depend_only_on_the_generator_seed() -> None:
    ds = data.load("digits")
    first = [next(ds.train.batches(32, True, torch.Generator().manual_seed(s)))[1] for s in (1, 1, 2)]
    assert torch.equal(first[0], first[1]) and not torch.equal(first[0], first[2])


def test_augmentation_keeps_shape_and_is_seeded() -> None:
    x = torch.randn(8, 3, 32, 32)
    a = data._crop_flip(x, torch.Generator().manual_seed(0))
    b = data._crop_flip(x, torch.Generator().manual_seed(0))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, x)


def test_fashion_mnist_is_found_where_debian_installs_it(fashion_dir: Path) -> None:
    ds = data.load("fashion-mnist")
    assert (len(ds.train), len(ds.val), len(ds.test)) == (54000, 6000, 10000)
    assert ds.input_shape == (1, 28, 28)
    train, val, test = _index_sets(ds)
    assert not train & val and len(train | val) == 60000  # test is the official 10k, its own file
    assert torch.bincount(ds.test.y).tolist() == [1000] * 10


def test_missing_data_dir_says_how_to_get_the_data(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"does not exist.*--download"):
        data.load("mnist", data_dir=tmp_path / "nowhere")
    with pytest.raises(UserError, match=r"mnist not found in .*train-images-idx3-ubyte.*--download"):
        data.load("mnist", data_dir=tmp_path)


def test_corrupt_idx_file_is_reported(tmp_path: Path) -> None:
    for stem in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):
        with gzip.open(tmp_path / f"{stem}.gz", "wb") as f:
            f.write(b"not an idx file")
    with pytest.raises(UserError, match="not a valid IDX file"):
        data.load("mnist", data_dir=tmp_path)


def test_unknown_dataset_names_close_matches() -> None:
    with pytest.raises(UserError, match="unknown dataset 'fashion_mnist'.*fashion-mnist"):
        data.load("fashion_mnist")


def _image_folder(root: Path, classes: int = 3, per_class: int = 10) -> Path:
    from PIL import Image

    gen = torch.Generator().manual_seed(0)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            pixels = torch.randint(0, 256, (12, 16, 3), generator=gen, dtype=torch.uint8).numpy()
            Image.fromarray(pixels).save(root / f"class{c}" / f"{i}.png")
    return root


def test_image_folder_is_split_and_resized(tmp_path: Path) -> None:
    ds = data.load(f"imagefolder:{_image_folder(tmp_path / 'imgs')}", image_size=20)
    assert ds.info.num_classes == 3 and ds.input_shape == (3, 20, 20)
    train, val, test = _index_sets(ds)
    assert not (train & val or train & test or val & test) and len(train | val | test) == 30
    x, y = next(ds.train.batches(8, shuffle=True, generator=torch.Generator().manual_seed(0)))
    assert x.shape == (8, 3, 20, 20) and y.max() < 3


def test_image_folder_without_classes_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="one sub-folder per class"):
        data.load(f"imagefolder:{tmp_path}")


def _cifar_files(root: Path, name: str, per_batch: int = 20) -> None:
    import pickle

    import numpy as np

    folder, train_files, test_file, label_key = data._CIFAR_FILES[name]
    classes = 10 if name == "cifar10" else 100
    rng = np.random.default_rng(0)
    (root / folder).mkdir(parents=True)
    for file in [*train_files, test_file]:
        batch = {"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                 label_key: [i % classes for i in range(per_batch)]}
        with open(root / folder / file, "wb") as f:
            pickle.dump(batch, f)


@pytest.mark.parametrize(("name", "train_files"), [("cifar10", 5), ("cifar100", 1)])
def test_cifar_batches_are_read_from_the_data_dir(tmp_path: Path, name: str, train_files: int) -> None:
    _cifar_files(tmp_path, name, per_batch=100 if name == "cifar100" else 20)
    ds = data.load(name, data_dir=tmp_path)
    n_train = train_files * (100 if name == "cifar100" else 20)
    assert len(ds.train) + len(ds.val) == n_train and len(ds.test) == (100 if name == "cifar100" else 20)
    assert ds.input_shape == (3, 32, 32) and ds.info.augment
    x, y = next(ds.train.batches(4, shuffle=True, generator=torch.Generator().manual_seed(0), augment=True))
    assert x.shape == (4, 3, 32, 32) and y.dtype == torch.int64


def test_missing_cifar_batch_is_reported(tmp_path: Path) -> None:
    _cifar_files(tmp_path, "cifar10")
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(UserError, match=r"data_batch_3 not found.*--download"):
        data.load("cifar10", data_dir=tmp_path)
