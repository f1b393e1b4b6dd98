from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import torch

from sparsesearch import models
from sparsesearch.errors import UserError
from sparsesearch.train import prepare

NATIVE_SHAPE = {"digits-cnn": (1, 8, 8), "lenet5": (1, 28, 28), "vgg11-bn": (3, 32, 32),
                "vgg16-bn": (3, 32, 32), "resnet20": (3, 32, 32), "resnet56": (3, 32, 32)}
# The torchvision classifiers the compaction work is held to; every other one runs in the slow test.
TV_NAMED = ["resnet18", "resnet50", "mobilenet_v2", "densenet121", "efficientnet_b0", "regnet_x_400mf",
            "shufflenet_v2_x1_0", "googlenet", "alexnet", "vgg11_bn", "convnext_tiny"]


def _forward(name: str, shape: tuple[int, int, int], num_classes: int = 10) -> torch.Tensor:
    torch.manual_seed(0)
    model = models.create(name, num_classes=num_classes, in_channels=shape[0]).eval()
    with torch.inference_mode():
        return model(torch.randn(2, *shape))


def test_every_builtin_is_listed_with_its_native_shape() -> None:
    assert sorted(s.name for s in models.builtin_specs()) == sorted(NATIVE_SHAPE)


@pytest.mark.parametrize("name", NATIVE_SHAPE)
def test_builtin_model_runs_on_its_dataset_shape(name: str) -> None:
    assert _forward(name, NATIVE_SHAPE[name], num_classes=7).shape == (2, 7)


@pytest.mark.parametrize("arch", TV_NAMED)
def test_torchvision_model_runs_at_its_minimum_input(arch: str) -> None:
    spec = models.spec(models.TV_PREFIX + arch)
    side = max(32, spec.min_size)
    assert _forward(spec.name, (3, side, side)).shape == (2, 10)


@pytest.mark.slow
@pytest.mark.parametrize("arch", models.torchvision_names())
def test_every_torchvision_classifier_builds_and_runs(arch: str) -> None:
    spec = models.spec(models.TV_PREFIX + arch)
    side = max(32, spec.min_size)
    assert _forward(spec.name, (3, side, side)).shape == (2, 10)


def test_user_factory_is_resolved_from_the_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "mynets.py").write_text(textwrap.dedent("""
        from torch import nn
        def tiny(num_classes):
            return nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.LazyLinear(num_classes))
    """))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert _forward("mynets:tiny", (1, 8, 8), num_classes=5).shape == (2, 5)


@pytest.mark.parametrize(("name", "expected"), [
    ("resnet-20", "resnet20"),
    ("digits_cnn", "digits-cnn"),
    ("tv:resnet19", "tv:resnet18"),
])
def test_unknown_model_names_close_matches(name: str, expected: str) -> None:
    with pytest.raises(UserError, match=f"unknown .*'{name}'.*{expected}"):
        models.spec(name)


@pytest.mark.parametrize(("name", "problem"), [
    ("no_such_module_xyz:build", "cannot import 'no_such_module_xyz'"),
    ("json:no_such_factory", "'json' has no callable 'no_such_factory'"),
    ("json:dumps", "cannot be called with no arguments"),
    ("fractions:Fraction", "returned Fraction, not a torch.nn.Module"),
])
def test_bad_user_factory_is_explained(name: str, problem: str) -> None:
    with pytest.raises(UserError, match=problem):
        models.create(name)


@pytest.mark.parametrize(("model", "dataset", "shape"), [
    ("tv:resnet18", "digits", (3, 8, 8)),  # grey repeated to RGB, size kept
    ("tv:alexnet", "digits", (3, 63, 63)),  # upsized to alexnet's minimum
    ("lenet5", "digits", (1, 28, 28)),
    ("resnet20", "digits", (1, 32, 32)),  # built-ins take the data's channels
])
def test_data_is_adapted_to_what_the_model_needs(model: str, dataset: str, shape: tuple[int, int, int]) -> None:
    net, ds = prepare(model, dataset)
    assert ds.input_shape == shape
    x, _ = next(ds.test.batches(4))
    assert x.shape == (4, *shape)
    assert net.eval()(x).shape == (4, 10)
