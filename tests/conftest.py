"""Shared fixtures: one trained digits baseline per session, Fashion-MNIST when installed, a
throwaway PostgreSQL server (tests/postgres.py) when one is installed, and tiny or read-only
disks (tmpfs, as root)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sparsesearch import data
from sparsesearch.train import DenseResult, TrainConfig, train_dense

from postgres import fresh_postgres_db, postgres_cluster, postgres_url  # noqa: F401  (tests/ is on sys.path)


@pytest.fixture(autouse=True)
def image_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Decoded image folders go to a folder of the test run's, never to the user's cache."""
    folder = tmp_path_factory.mktemp("image-cache")
    monkeypatch.setenv("SPARSESEARCH_CACHE", str(folder))
    return folder


@pytest.fixture(scope="session")
def digits_baseline(tmp_path_factory: pytest.TempPathFactory) -> DenseResult:
    """The default main job (digits-cnn on digits, default config), trained once for all tests."""
    out = tmp_path_factory.mktemp("baseline") / "dense.pt"
    return train_dense("digits-cnn", "digits", TrainConfig(), torch.device("cpu"), out)


@pytest.fixture(scope="session")
def fashion_dir() -> Path:
    if not (data.FASHION_MNIST_SYSTEM_DIR / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("Debian's dataset-fashion-mnist is not installed (make setup installs it as root)")
    return data.FASHION_MNIST_SYSTEM_DIR


def _mounted(path: Path, options: str):  # noqa: ANN202
    """A 1 MB tmpfs at `path` for one test (root only; skipped elsewhere)."""
    import subprocess

    path.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size=1m,{options}", "tmpfs", str(path)],
                      capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield path
    subprocess.run(["umount", "--lazy", str(path)], check=False)  # lazy: a test may still hold a file open


@pytest.fixture
def tiny_disk(tmp_path: Path):  # noqa: ANN201
    yield from _mounted(tmp_path / "disk", "rw")


@pytest.fixture
def read_only(tmp_path: Path):  # noqa: ANN201
    yield from _mounted(tmp_path / "ro", "ro")
