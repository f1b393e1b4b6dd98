from __future__ import annotations

import gzip
from pathlib import Path

import pytest
import torch

from sparsesearch import data, folders
from sparsesearch.errors import UserError

from helpers import image_folder


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
    counts = torch.bincount(a.test.labels, minlength=10)
    assert counts.min() >= 34 and counts.max() <= 38  # 20% of ~180 per class


def test_train_batches_are_normalised() -> None:
    ds = data.load("digits")
    x = torch.cat([xb for xb, _ in ds.train.batches(256)])
    assert abs(x.mean().item()) < 1e-4 and abs(x.std().item() - 1) < 1e-2


def test_shuffled_batches_depend_only_on_the_generator_seed() -> None:
    ds = data.load("digits")
    first = [next(ds.train.batches(32, True, torch.Generator().manual_seed(s)))[1] for s in (1, 1, 2)]
    assert torch.equal(first[0], first[1]) and not torch.equal(first[0], first[2])


@pytest.mark.parametrize("side", [32, 224])
def test_augmentation_keeps_shape_and_is_seeded(side: int) -> None:
    x = torch.randn(8, 3, side, side)
    a = data.augmented(x.clone(), torch.Generator().manual_seed(0))
    b = data.augmented(x.clone(), torch.Generator().manual_seed(0))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, x)


def test_a_resized_crop_of_the_whole_image_is_the_image() -> None:
    x = torch.randn(4, 3, 64, 64)
    assert torch.allclose(data._resized_crop(x, None, scale=(1, 1), ratio=(1, 1)), x, atol=1e-5)


def test_a_resized_crop_of_a_quarter_of_the_area_magnifies_twice() -> None:
    x = torch.arange(64.0).expand(16, 1, 64, 64).clone()  # a horizontal ramp, 0..63
    crops = data._resized_crop(x, torch.Generator().manual_seed(0), scale=(0.25, 0.25), ratio=(1, 1))
    assert torch.allclose(crops[..., -1] - crops[..., 0], torch.tensor(31.5), atol=1e-3)  # half the ramp
    assert crops[:, 0, 0, 0].std() > 3  # from boxes at different places


def test_fashion_mnist_is_found_where_debian_installs_it(fashion_dir: Path) -> None:
    ds = data.load("fashion-mnist")
    assert (len(ds.train), len(ds.val), len(ds.test)) == (54000, 6000, 10000)
    assert ds.input_shape == (1, 28, 28)
    train, val, test = _index_sets(ds)
    assert not train & val and len(train | val) == 60000  # test is the official 10k, its own file
    assert torch.bincount(ds.test.labels).tolist() == [1000] * 10


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


def test_image_folder_is_split_and_resized(tmp_path: Path) -> None:
    ds = data.load(f"imagefolder:{image_folder(tmp_path / 'imgs')}", image_size=20)
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


def test_image_folder_is_decoded_once_and_then_read_from_the_cache(
        tmp_path: Path, image_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"imagefolder:{image_folder(tmp_path / 'imgs')}"
    first = data.load(name, image_size=20)
    assert len(list(image_cache.glob("*.npy"))) == 1

    def no_decoding(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("decoded again although the folder did not change")

    monkeypatch.setattr(folders, "_decode_into", no_decoding)
    second = data.load(name, image_size=20)
    assert torch.equal(second.train.x, first.train.x) and torch.equal(second.test.labels, first.test.labels)


def test_the_cache_holds_what_torchvision_resize_makes_of_each_image(tmp_path: Path) -> None:
    import torchvision.transforms as T
    from PIL import Image

    folder = folders.Folder.scan(image_folder(tmp_path / "imgs"))
    x = folders.images(folder, 20)
    resize = T.Compose([T.Resize((20, 20)), T.PILToTensor()])
    for i in (0, 13, 29):
        assert torch.equal(x[i], resize(Image.open(folder.files[i]).convert("RGB")))
    assert folder.labels.tolist() == [0] * 10 + [1] * 10 + [2] * 10


def test_a_changed_folder_is_decoded_again_and_its_old_cache_removed(tmp_path: Path, image_cache: Path) -> None:
    from PIL import Image

    root = image_folder(tmp_path / "imgs")
    before = folders.images(folders.Folder.scan(root), 20).clone()
    old = set(image_cache.glob("*.npy"))
    Image.new("RGB", (12, 16), (255, 0, 0)).save(root / "class0" / "0.png")  # same name, new pixels
    after = folders.images(folders.Folder.scan(root), 20)
    assert not torch.equal(after[0], before[0]) and torch.equal(after[1:], before[1:])
    assert after[0, 0].eq(255).all() and after[0, 1:].eq(0).all()
    assert not old & set(image_cache.glob("*.npy")) and len(list(image_cache.glob("*.npy"))) == 1


def test_an_unwritable_cache_costs_one_notice_and_a_decode_in_memory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    root = image_folder(tmp_path / "imgs")
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the cache folder should be")
    monkeypatch.setenv(folders.CACHE_ENV, str(blocked / "cache"))
    with caplog.at_level("INFO", logger="sparsesearch"):
        x = folders.images(folders.Folder.scan(root), 20)
    notices = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(notices) == 1 and "cannot write the image cache" in notices[0] and folders.CACHE_ENV in notices[0]
    monkeypatch.setenv(folders.CACHE_ENV, str(tmp_path / "cache"))
    assert torch.equal(x, folders.images(folders.Folder.scan(root), 20))


def test_a_cache_on_a_full_disk_falls_back_without_a_crash(tiny_disk: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    root = image_folder(tmp_path / "imgs", per_class=200)  # 600 x 3 x 40 x 40 bytes: 2.9 MB > 1 MB
    monkeypatch.setenv(folders.CACHE_ENV, str(tiny_disk))
    x = folders.images(folders.Folder.scan(root), 40)
    assert x.shape == (600, 3, 40, 40) and not list(tiny_disk.iterdir())  # nothing half-written left


def test_a_corrupt_cache_file_is_decoded_again(tmp_path: Path, image_cache: Path) -> None:
    folder = folders.Folder.scan(image_folder(tmp_path / "imgs"))
    x = folders.images(folder, 20).clone()
    (cached,) = image_cache.glob("*.npy")
    cached.write_bytes(cached.read_bytes()[:500])  # truncated, say by a crash of another tool
    assert torch.equal(folders.images(folder, 20), x)


def test_an_image_that_cannot_be_decoded_is_named(tmp_path: Path) -> None:
    root = image_folder(tmp_path / "imgs")
    (root / "class1" / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(UserError, match=r"cannot decode .*class1/broken\.jpg .*remove or convert"):
        data.load(f"imagefolder:{root}", image_size=20)


def test_train_and_test_folders_must_name_the_same_classes(tmp_path: Path) -> None:
    image_folder(tmp_path / "imgs" / "train")
    image_folder(tmp_path / "imgs" / "test", classes=2)
    with pytest.raises(UserError, match="different class folders"):
        data.load(f"imagefolder:{tmp_path / 'imgs'}", image_size=20)


def test_train_folder_is_split_into_train_and_validation_and_test_folder_is_the_test_split(tmp_path: Path) -> None:
    image_folder(tmp_path / "imgs" / "train", per_class=20)
    image_folder(tmp_path / "imgs" / "test", per_class=4)
    ds = data.load(f"imagefolder:{tmp_path / 'imgs'}", image_size=16)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (54, 6, 12)
    assert torch.bincount(ds.val.labels).tolist() == [2, 2, 2]


def test_a_subset_is_fixed_stratified_and_inside_its_split() -> None:
    train = data.load("digits").train
    a, b = train.subset(0.25), train.subset(0.25)
    assert torch.equal(a.index, b.index) and len(a) == round(0.25 * len(train))
    assert set(a.index.tolist()) <= set(train.index.tolist())
    share = torch.bincount(a.labels, minlength=10) / torch.bincount(train.labels, minlength=10)
    assert share.min() > 0.2 and share.max() < 0.3  # every class at about a quarter
    assert train.subset(1.0) is train
    with pytest.raises(UserError, match="fraction in \\(0, 1\\]"):
        train.subset(0)
