from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn
from helpers import layout_verdict

from sparsesearch import checkpoint, data, models, train
from sparsesearch.errors import UserError
from sparsesearch.train import DenseResult, TrainConfig, fit, prepare, train_dense

CPU = torch.device("cpu")


def test_default_baseline_reaches_97_percent(digits_baseline: DenseResult) -> None:
    assert digits_baseline.test_acc >= 97.0


def test_sidecar_records_what_made_the_checkpoint(digits_baseline: DenseResult) -> None:
    meta = json.loads(digits_baseline.checkpoint.with_suffix(".json").read_text())
    assert meta["schema"] == 1 and meta["model"] == "digits-cnn" and meta["dataset"] == "digits"
    assert meta["sizes"] == {"train": 1078, "val": 359, "test": 360} and meta["split_seed"] == 0
    assert meta["accuracy"]["test"] == pytest.approx(digits_baseline.test_acc)
    assert meta["epochs"] == 20 and meta["seed"] == 0 and meta["versions"]["torch"] == torch.__version__


def test_checkpoint_round_trip_gives_identical_outputs(digits_baseline: DenseResult) -> None:
    model, ds = prepare("digits-cnn", "digits", weights=digits_baseline.checkpoint)
    model.eval()
    x, _ = next(ds.test.batches(64))
    state = torch.load(digits_baseline.checkpoint, weights_only=True)
    reference = models.create("digits-cnn", in_channels=1)
    reference.load_state_dict(state)
    assert torch.equal(model(x), reference.eval()(x))


def test_checkpoint_for_another_model_is_refused(digits_baseline: DenseResult) -> None:
    with pytest.raises(UserError, match=r"does not fit model 'lenet5'.*--model digits-cnn --dataset digits"):
        prepare("lenet5", "digits", weights=digits_baseline.checkpoint)


def test_corrupt_checkpoint_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x80\x04garbage")
    with pytest.raises(UserError, match="not a readable weights-only torch checkpoint"):
        checkpoint.load_state(bad)


def test_checkpoint_with_code_is_not_executed(tmp_path: Path) -> None:
    path = tmp_path / "pickled.pt"
    torch.save(models.create("digits-cnn", in_channels=1), path)  # a whole module, not a state dict
    with pytest.raises(UserError, match="weights-only"):
        checkpoint.load_state(path)


def test_training_is_deterministic_with_a_seed() -> None:
    states = []
    for _ in range(2):
        model, ds = prepare("digits-cnn", "digits", seed=3)
        fit(model, ds, TrainConfig(epochs=1, seed=3), CPU)
        states.append(model.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def _stop_in_epoch_3(p) -> None:  # noqa: ANN001
    if p.epoch == 3:
        raise KeyboardInterrupt


def _whole_and_resumed(tmp_path: Path, config: TrainConfig, before_resume: Callable[[], None] = lambda: None
                       ) -> tuple[dict, dict, DenseResult]:
    """digits-cnn trained whole, and again cut in its third epoch and resumed (`before_resume` in between):
    both checkpoints' tensors, and the resumed run."""
    whole = train_dense("digits-cnn", "digits", config, CPU, tmp_path / "whole" / "dense.pt")
    out = tmp_path / "cut" / "dense.pt"
    with pytest.raises(KeyboardInterrupt):
        train_dense("digits-cnn", "digits", config, CPU, out, on_progress=_stop_in_epoch_3)
    assert not out.exists() and (tmp_path / "cut" / "dense.resume.pt").is_file()
    before_resume()
    resumed = train_dense("digits-cnn", "digits", config, CPU, out)
    return torch.load(whole.checkpoint, weights_only=True), torch.load(out, weights_only=True), resumed


def test_an_interrupted_training_continues_to_the_weights_of_an_uninterrupted_one(tmp_path: Path) -> None:
    a, b, resumed = _whole_and_resumed(tmp_path, TrainConfig(epochs=3, seed=1))
    assert resumed.history.resumed_after == 2 and not (tmp_path / "cut" / "dense.resume.pt").exists()
    assert [e["epoch"] for e in resumed.history.epochs] == [1, 2, 3]
    assert all(torch.equal(a[k], b[k]) for k in a)
    other = train_dense("digits-cnn", "digits", TrainConfig(epochs=1, seed=1), CPU, tmp_path / "cut" / "dense.pt")
    assert other.history.resumed_after == 0, "a snapshot of another run is not resumed"


def test_a_run_goes_on_in_the_layout_it_began_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Layouts round differently (digits-cnn: 4.5e-4 apart after an epoch): a run begun channels-last
    and resumed where the verdict is contiguous must still end with the weights of an uninterrupted run."""
    layout_verdict(monkeypatch, "channels-last")
    config = TrainConfig(epochs=3, seed=1)
    a, b, _ = _whole_and_resumed(tmp_path, config, lambda: layout_verdict(monkeypatch, "contiguous"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    contiguous = train_dense("digits-cnn", "digits", config, CPU, tmp_path / "contiguous" / "dense.pt")
    c = torch.load(contiguous.checkpoint, weights_only=True)
    assert not all(torch.equal(a[k], c[k]) for k in a), "the two layouts round alike: this test proves nothing"
    assert all(v.is_contiguous() for v in a.values()), "the checkpoint is in torch's own layout"


def test_a_run_told_its_layout_trains_in_it_whatever_the_timing_says(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A study fixes the layout its runs train in (`SearchConfig.train_layout`), so one plan retrained
    twice ends alike even where the timing, near its margin, would choose the other layout."""
    config = TrainConfig(epochs=1, seed=1)
    layout_verdict(monkeypatch, "channels-last")
    timed = train_dense("digits-cnn", "digits", config, CPU, tmp_path / "timed" / "dense.pt")
    layout_verdict(monkeypatch, "contiguous")
    told = train_dense("digits-cnn", "digits", dataclasses.replace(config, layout="channels-last"), CPU,
                       tmp_path / "told" / "dense.pt")
    untold = train_dense("digits-cnn", "digits", config, CPU, tmp_path / "untold" / "dense.pt")
    a, b, c = (torch.load(r.checkpoint, weights_only=True) for r in (timed, told, untold))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a), "the two layouts round alike: this test proves nothing"


class _Viewed(nn.Module):
    """A user's net that flattens its feature map with `.view`, which a channels-last map refuses."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv2d(1, 8, 3, padding=1), nn.Linear(8 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x).relu()
        return self.fc(y.view(y.shape[0], -1))


def test_a_net_that_cannot_run_channels_last_trains_as_it_is(monkeypatch: pytest.MonkeyPatch) -> None:
    layout_verdict(monkeypatch, "channels-last")
    model, ds = prepare("digits-cnn", "digits")
    x, y = next(ds.train.batches(64))
    assert train.training_layout(model, x, y, CPU) == "channels-last"
    viewed = _Viewed()
    assert train.training_layout(viewed, x, y, CPU) == "contiguous"
    history = fit(viewed, ds, TrainConfig(epochs=1), CPU)
    assert history.val_acc > 50


def test_bfloat16_training_learns_as_float32_training_does(digits_baseline: DenseResult, tmp_path: Path) -> None:
    """Under bfloat16 autocast the forward pass rounds to 8 bits of mantissa; the weights, their
    gradients and the optimizer stay float32, and the model learns as well (digits-cnn, 20 epochs)."""
    result = train_dense("digits-cnn", "digits", TrainConfig(precision="bfloat16"), CPU, tmp_path / "dense.pt")
    assert abs(result.test_acc - digits_baseline.test_acc) <= 1.5
    weights = torch.load(result.checkpoint, weights_only=True)
    reference = torch.load(digits_baseline.checkpoint, weights_only=True)
    assert all(w.dtype == reference[k].dtype for k, w in weights.items())
    assert not all(torch.equal(w, reference[k]) for k, w in weights.items()), "trained in float32 after all"
    with pytest.raises(UserError, match="--precision must be one of float32, bfloat16, got 'float16'"):
        TrainConfig(precision="float16")


def test_fractional_epochs_run_that_share_of_steps() -> None:
    model, ds = prepare("digits-cnn", "digits")
    steps: list[int] = []
    fit(model, ds, TrainConfig(epochs=0.5, batch_size=64), CPU, on_progress=lambda p: steps.append(p.total))
    assert steps[-1] == 9  # ceil(0.5 * ceil(1078 / 64))


@pytest.mark.parametrize("field", ["epochs", "batch_size", "lr"])
def test_non_positive_budget_is_refused(field: str) -> None:
    with pytest.raises(UserError, match=field.replace("_", "-")):
        TrainConfig(**{field: 0})


@pytest.mark.slow
def test_lenet5_on_fashion_mnist_reaches_89_percent(fashion_dir: Path, tmp_path: Path) -> None:
    config = TrainConfig(epochs=data.info("fashion-mnist").epochs)
    result = train_dense("lenet5", "fashion-mnist", config, CPU, tmp_path / "lenet5.pt")
    assert result.test_acc >= 89.0


def test_a_paired_drop_counts_only_the_images_the_two_models_disagree_on() -> None:
    from sparsesearch.train import paired_drop

    dense = torch.tensor([True] * 90 + [False] * 10)
    pruned = dense.clone()
    pruned[:3] = False  # loses three images the dense model got right
    drop, se = paired_drop(dense, pruned)
    assert drop == pytest.approx(3.0)
    d = torch.tensor([1.0] * 3 + [0.0] * 97)
    assert se == pytest.approx(100 * d.std().item() / 10)  # per-image differences, n = 100
    independent = 100 * (2 * 0.9 * 0.1 / 100) ** 0.5  # two accuracies measured apart: ~4.2 points
    assert se < independent / 2
    assert paired_drop(dense, dense) == (0.0, 0.0)
