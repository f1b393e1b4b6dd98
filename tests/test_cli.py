"""The command line as a user meets it: listings, a training run, and one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from sparsesearch.cli import app
from sparsesearch.train import DenseResult

runner = CliRunner()


def test_models_lists_builtins_torchvision_and_user_factories() -> None:
    result = runner.invoke(app, ["models"])
    assert result.exit_code == 0
    for name in ("digits-cnn", "lenet5", "vgg16-bn", "resnet56", "tv:resnet18", "tv:mobilenet_v2", "package.module:factory"):
        assert name in result.stdout


def test_datasets_lists_every_dataset() -> None:
    result = runner.invoke(app, ["datasets"])
    assert result.exit_code == 0
    for name in ("digits", "mnist", "fashion-mnist", "cifar10", "cifar100", "imagefolder:PATH"):
        assert name in result.stdout


def test_train_writes_checkpoint_and_sidecar(tmp_path: Path) -> None:
    out = tmp_path / "run" / "dense.pt"
    result = runner.invoke(app, ["train", "--epochs", "1", "--out", str(out), "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert out.is_file() and out.with_suffix(".json").is_file()
    assert "test" in result.stdout and str(out) in result.stdout.replace("\n", "")


def _error(args: list[str]) -> str:
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_unknown_model_is_one_line_with_close_matches() -> None:
    assert "did you mean resnet20" in _error(["train", "--model", "resnet-20"])


def test_unknown_dataset_is_one_line_with_close_matches() -> None:
    assert "did you mean cifar10" in _error(["train", "--dataset", "cifar-10"])


def test_missing_data_dir_is_one_line(tmp_path: Path) -> None:
    line = _error(["train", "--model", "lenet5", "--dataset", "mnist", "--data-dir", str(tmp_path / "none")])
    assert "does not exist" in line and "--download" in line


def test_mismatched_checkpoint_is_one_line(digits_baseline: DenseResult) -> None:
    line = _error(["train", "--model", "resnet20", "--checkpoint", str(digits_baseline.checkpoint)])
    assert "does not fit model 'resnet20'" in line


def test_missing_checkpoint_is_one_line(tmp_path: Path) -> None:
    assert "checkpoint not found" in _error(["train", "--checkpoint", str(tmp_path / "nope.pt")])


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_gpu_is_one_line() -> None:
    assert "no CUDA GPU" in _error(["train", "--device", "cuda"])
