"""Shared by tests: a randomly initialised model made to behave like a trained one where it matters,
a latency profile passed off as another device's, an image folder, a training-layout verdict, and two
copies of one compacted model compared."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from torch import nn


def lively(model: nn.Module, input_shape: tuple[int, ...], seed: int = 0) -> nn.Module:
    """BatchNorm statistics measured on random inputs, then affine parameters drawn away from identity.

    With made-up statistics a deep random net can give the same output for every input (its
    activations vanish under the running means), and then any equality check passes. Measured
    statistics keep the outputs varying; random gamma and beta make a ghost channel (BN(0) != 0)
    or a silenced one visible. Returns the model in eval mode.
    """
    generator = torch.Generator().manual_seed(seed)
    restat(model, input_shape, generator)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
                m.weight.copy_(torch.empty_like(m.weight).uniform_(0.5, 1.5, generator=generator))
                m.bias.copy_(torch.empty_like(m.bias).uniform_(-0.5, 0.5, generator=generator))
    return model.eval()


def restat(model: nn.Module, input_shape: tuple[int, ...], generator: torch.Generator | None = None) -> nn.Module:
    """BatchNorm running statistics measured on 8 random inputs: what keeps a model's outputs
    varying once pruning has moved its activations (masked entries stay zero); eval mode."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the calibration batch
    with torch.no_grad():
        model.train()(torch.randn(8, *input_shape, generator=generator or torch.Generator().manual_seed(0)))
    for m in norms:
        m.momentum = 0.1
    return model.eval()


def with_fingerprint(source: Path, dest: Path, **changes: object) -> Path:
    """A copy of the profile at `source` whose fingerprint says `changes` (another device, batch...)."""
    raw = json.loads(Path(source).read_text())
    raw["fingerprint"].update(changes)
    Path(dest).write_text(json.dumps(raw))
    return Path(dest)


def image_folder(root: Path, classes: int = 3, per_class: int = 10) -> Path:
    """ROOT/classK/I.png: small random RGB images, one sub-folder per class, as users keep them."""
    from PIL import Image

    gen = torch.Generator().manual_seed(0)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            pixels = torch.randint(0, 256, (12, 16, 3), generator=gen, dtype=torch.uint8).numpy()
            Image.fromarray(pixels).save(root / f"class{c}" / f"{i}.png")
    return root


@contextmanager
def no_channel_steps() -> Iterator[None]:
    """Profiles made inside it record no channel step: the scan, timed in a few fast rounds on a busy
    test machine, may find one or not, and a found step changes the plans a study draws (`Plan.aligned`);
    tests of a study need the same plans on every run."""
    from sparsesearch.profiler import steps

    real = steps.scan
    steps.scan = lambda *args, **kwargs: {"out": 1, "in": 1}
    try:
        yield
    finally:
        steps.scan = real


def layout_verdict(monkeypatch: pytest.MonkeyPatch, layout: str) -> None:
    """Make a new process's training-layout verdict `layout` for every model that can run it, as the
    timing on a busy machine may (`train.training_layout`)."""
    from sparsesearch import train

    monkeypatch.setattr(train, "_LAYOUTS", {})
    monkeypatch.setattr(train, "STEP_FLOOR_S", 0.0)
    monkeypatch.setattr(train, "CHANNELS_LAST_GAIN", 0.0 if layout == "channels-last" else math.inf)


def assert_same_outputs(a: torch.Tensor, b: torch.Tensor) -> None:
    """Two copies of one compacted model on one input: equal up to float rounding. Each copy's shape-
    and channel-wise layers time their forms on their first call and may pick others, which sum the
    same products in another order (the compiled kernel in address order, torch's GEMM in its own)."""
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@contextmanager
def float64() -> Iterator[None]:
    """Tensors made inside it are float64: two computations that must agree (a slim model trained
    and its masked original) then differ by rounding at 1e-15, not float32's 1e-4 after a few
    training steps, so the comparison can be tight."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def masked_sgd_steps(model: nn.Module, masks: dict[str, torch.Tensor], shape: tuple[int, ...]) -> None:
    """Three masked SGD steps (momentum, weight decay) in training mode on fixed random batches (and
    dropout masks), as retraining takes them: what a slim model and its masked original must agree on."""
    from sparsesearch.admm import masked_hooks

    torch.manual_seed(4)
    hooks, generator = masked_hooks(model, masks), torch.Generator().manual_seed(3)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=5e-4)
    model.train()
    for step in range(3):
        x, y = torch.randn(8, *shape, generator=generator), torch.randint(0, 10, (8,), generator=generator)
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x).flatten(1)[:, :10], y).backward()
        hooks.before_step()
        optimizer.step()
        hooks.after_step(step)
