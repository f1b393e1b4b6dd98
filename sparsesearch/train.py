"""Training and evaluation shared by every stage: the dense baseline, ADMM's W-step and masked
retraining differ only in the hooks they pass to `fit` (an extra loss term, gradient and weight masks).
"""

from __future__ import annotations

import copy
import datetime
import math
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from . import checkpoint, data, models
from .errors import Diverged, UserError
from .files import torch_save
from .profiler.timing import call_seconds
from .runtime import DEFAULT_LAYOUT, LAYOUTS, in_layout, versions


@dataclass
class TrainConfig:
    """SGD with momentum and a cosine learning-rate decay over the whole budget."""

    epochs: float = 20  # fractional epochs are fine: short multi-fidelity trials need them
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    seed: int = 0
    precision: str = "float32"  # or "bfloat16": the forward pass under autocast (`autocast`)
    # the memory layout it trains in; "": `training_layout` times it. The layouts round differently, so
    # two runs of one recipe agree only in one layout: a study fixes its own (`SearchConfig.train_layout`)
    layout: str = ""

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "lr"):
            if getattr(self, name) <= 0:
                raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        check_precision(self.precision)


@dataclass
class Progress:
    """Sent after every optimisation step, for progress bars; `val_acc` is set at epoch ends."""

    step: int
    total: int
    epoch: int
    loss: float
    val_acc: float | None = None
    phase: str = "train"


@dataclass
class Hooks:
    """How ADMM and masked retraining bend plain SGD without a training loop of their own."""

    penalty: Callable[[], Tensor] | None = None  # added to the loss (ADMM's rho/2 ||W - Z + U||^2)
    before_step: Callable[[], None] | None = None  # after backward: e.g. zero pruned gradients
    after_step: Callable[[int], None] | None = None  # after optimizer.step, given the step count


@dataclass
class History:
    epochs: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0  # of this run
    resumed_after: int = 0  # epochs an interrupted run had finished, continued from its snapshot

    @property
    def val_acc(self) -> float | None:
        """After the last epoch; None when not validated."""
        return self.epochs[-1]["val_acc"] if self.epochs else None


@dataclass(frozen=True)
class Snapshot:
    """Where `fit` keeps its state at the end of each epoch (weights, optimizer, schedule, shuffling)
    and which run it belongs to (`key`). A run that finds its own snapshot continues from it, so an
    interrupted run ends with the weights an uninterrupted one would have; another run's is ignored."""

    path: Path
    key: dict[str, object]

    def load(self) -> dict | None:
        if not self.path.is_file():
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001 - unreadable (another torch, a damaged disk): start over
            return None
        return state if isinstance(state, dict) and state.get("key") == self.key else None

    def save(self, state: dict) -> None:
        torch_save(self.path, {**state, "key": self.key})


ProgressFn = Callable[[Progress], None]


def correct(model: nn.Module, split: data.Split, device: torch.device, batch_size: int = 256) -> Tensor:
    """Per image of `split`, in order, whether the model's top-1 class is right (eval mode: BatchNorm
    running statistics). Two models' vectors on one split compare image by image (a paired test)."""
    was_training = model.training
    model.eval()
    right = []
    with torch.inference_mode():
        for x, y in split.batches(batch_size):
            right.append(model(x.to(device)).argmax(1).cpu() == y)
    model.train(was_training)
    return torch.cat(right) if right else torch.zeros(0, dtype=torch.bool)


@contextmanager
def refreshed_batchnorm(model: nn.Module, split: data.Split | None, device: torch.device,
                        batch_size: int = 64) -> Iterator[None]:
    """Within the block, BatchNorm running statistics re-estimated on `split` (training images,
    a forward in train mode without gradient, averaged over all its batches); restored after.

    Pruning shifts every later layer's activations away from the statistics the dense model
    gathered; scored with them, a deep BatchNorm net's projection sits near chance whatever the
    plan (resnet56 on Fashion-MNIST, filter 30%: 16.7% stale, 67.2% re-estimated on 512 images),
    so the check cannot rank plans. Re-estimating is the adaptive BatchNorm of EagleEye."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if split is None or not norms:
        yield
        return
    modes = {m: m.training for m in model.modules()}
    saved = [(m.momentum, [b.clone() for b in m.buffers(recurse=False)]) for m in norms]
    try:
        model.eval()
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # a plain average over the batches
            m.train()
        with torch.no_grad():
            for x, _ in split.batches(batch_size):
                model(x.to(device))
        model.eval()
        yield
    finally:
        with torch.no_grad():
            for m, (momentum, buffers) in zip(norms, saved):
                m.momentum = momentum
                for b, old in zip(m.buffers(recurse=False), buffers):
                    b.copy_(old)
        for m, training in modes.items():
            m.training = training


def paired_drop(reference: Tensor, other: Tensor) -> tuple[float, float]:
    """Accuracy points `other` loses against `reference` on the same images, and the standard error
    of that drop. Taken image by image, so the images both get right (or both wrong) add no noise:
    far tighter than the error of two accuracies measured apart (about ±1.4 pt each on 1,000 images)."""
    d = reference.float() - other.float()
    se = d.std().item() / math.sqrt(len(d)) if len(d) > 1 else math.inf
    return 100.0 * d.mean().item(), 100.0 * se


def confidence_within(drop: float, se: float, limit: float) -> float:
    """How sure the validation set makes us that the true drop is within `limit`: P(drop <= limit)
    under a normal error of `se` (0.5 at the limit; ~0.84 one standard error inside it)."""
    if se == 0 or not math.isfinite(se):
        return float(drop <= limit)
    return 0.5 * (1 + math.erf((limit - drop) / (se * math.sqrt(2))))


def evaluate(model: nn.Module, split: data.Split, device: torch.device, batch_size: int = 256) -> float:
    """Top-1 accuracy in percent."""
    return percent(correct(model, split, device, batch_size))


def percent(right: Tensor) -> float:
    """Top-1 accuracy in percent from `correct`'s per-image vector (0 for no images)."""
    return 100.0 * right.float().mean().item() if len(right) else 0.0


PRECISIONS = ("float32", "bfloat16")


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise UserError(f"--precision must be one of {', '.join(PRECISIONS)}, got '{precision}'")


def autocast(device: torch.device, precision: str) -> torch.autocast:
    """The forward pass of a training step in `precision`: bfloat16 runs convs and matmuls in
    bfloat16 (weights, gradients, the optimizer and ADMM's penalty stay float32). Where the CPU has
    bfloat16 units (AMX, AVX512-BF16) a step runs 1.7-2.5x faster: vgg16-bn and resnet56 at batch 64,
    1 thread, Xeon (bench/results/train_precision.md)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bfloat16")


@contextmanager
def _laid_out(model: nn.Module, layout: str) -> Iterator[None]:
    """The model in `layout` within the block, and in torch's own after it, as every other stage reads
    it (even on Ctrl-C)."""
    in_layout(model, layout)
    try:
        yield
    finally:
        in_layout(model, DEFAULT_LAYOUT)


CHANNELS_LAST_GAIN = 1.1  # how much faster a channels-last training step must run for `fit` to train so
STEP_FLOOR_S = 0.05  # a step faster than this trains as it is: little to gain, and the timing would cost more
_LAYOUTS: dict[tuple, str] = {}  # `training_layout`'s verdicts, per architecture, batch, device and threads


def training_layout(model: nn.Module, x: Tensor, y: Tensor, device: torch.device, precision: str = "float32") -> str:
    """The layout `fit` trains `model` in on batches like (x, y): channels-last where a training step
    (forward, loss, backward) of at least STEP_FLOOR_S runs CHANNELS_LAST_GAIN times faster so.
    oneDNN's channels-last kernels suit thin convs: resnet56 and resnet20 on Fashion-MNIST at batch
    128, 1 thread, train 1.27x and 1.25x faster so (Xeon, bench/results/train_layout_xeon.md), and a
    step at batch 16-64 1.18-1.24x; vgg16-bn's no faster (0.86-0.97x). Timed once per process and
    architecture on a copy, so the model (its BatchNorm statistics too) and the global generator are
    untouched. The margin keeps the verdict from flipping on timing noise, since the two layouts
    round differently. A model that cannot run channels-last (a `.view` of a feature map) trains as
    it is. Timed in the `precision` it trains in: in bfloat16 resnet56 gains 1.35x from channels-last."""
    key = (tuple(type(m) for m in model.modules()), tuple((n, tuple(p.shape)) for n, p in model.named_parameters()),
           tuple(x.shape), device.type, torch.get_num_threads(), precision)
    if key not in _LAYOUTS:
        _LAYOUTS[key] = DEFAULT_LAYOUT
        # RuntimeError: no channels-last kernel, or a view that the layout breaks
        with suppress(RuntimeError), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            step = _step_seconds(model, x, y, device, DEFAULT_LAYOUT, precision) if x.dim() == 4 else 0.0
            if step >= STEP_FLOOR_S:
                last = _step_seconds(model, x, y, device, "channels-last", precision)
                _LAYOUTS[key] = "channels-last" if step >= CHANNELS_LAST_GAIN * last else DEFAULT_LAYOUT
    return _LAYOUTS[key]


def _step_seconds(model: nn.Module, x: Tensor, y: Tensor, device: torch.device, layout: str,
                  precision: str) -> float:
    """The fastest of three training steps, after a warm-up one, of a copy of `model` in `layout`."""
    trained = in_layout(copy.deepcopy(model).to(device).train(), layout)
    x, y = in_layout(x.to(device), layout), y.to(device)

    def step(x: Tensor) -> None:
        with autocast(device, precision):
            loss = nn.functional.cross_entropy(trained(x), y)
        loss.backward()

    step(x)
    return min(call_seconds(step, x, 1) for _ in range(3))


def fit(model: nn.Module, dataset: data.Data, config: TrainConfig, device: torch.device,
        hooks: Hooks | None = None, on_progress: ProgressFn | None = None, snapshot: Snapshot | None = None,
        validate: bool = True) -> History:
    """Train `model` in place for `config.epochs` (possibly fractional) epochs on the train split;
    with a `snapshot`, resumable from the last finished epoch. `validate` evaluates the validation
    split after each epoch (a short search trial skips it: evaluation would cost more than training)."""
    hooks = hooks or Hooks()
    steps_per_epoch = math.ceil(len(dataset.train) / config.batch_size)
    total = max(1, math.ceil(config.epochs * steps_per_epoch))
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay, nesterov=True)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)))
    generator = torch.Generator().manual_seed(config.seed)
    loss_fn = nn.CrossEntropyLoss()
    history, start, step, epoch = History(), time.perf_counter(), 0, 0
    model.to(device).train()
    state = snapshot.load() if snapshot is not None else None
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        generator.set_state(state["generator"])
        step, epoch, history.epochs = state["step"], state["epoch"], state["history"]
        history.resumed_after = epoch
    # a resumed run keeps the layout it rounded in (a snapshot from before layouts were chosen: torch's own)
    layout = state.get("layout", DEFAULT_LAYOUT) if state else config.layout or training_layout(
        model, *next(dataset.train.batches(config.batch_size)), device, config.precision)
    with _laid_out(model, layout):
        while step < total:
            epoch += 1
            running, seen = 0.0, 0
            for x, y in dataset.train.batches(config.batch_size, True, generator, dataset.info.augment):
                with autocast(device, config.precision):
                    loss = loss_fn(model(in_layout(x.to(device), layout)), y.to(device))
                if hooks.penalty is not None:
                    loss = loss + hooks.penalty()
                value = loss.item()
                if not math.isfinite(value):
                    raise Diverged(f"training diverged: the loss is {value} at step {step + 1} of {total} (lr "
                                   f"{config.lr:g}); lower the learning rate. Nothing was written")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if hooks.before_step is not None:
                    hooks.before_step()
                optimizer.step()
                schedule.step()
                step += 1
                if hooks.after_step is not None:
                    hooks.after_step(step)
                running, seen = running + value * len(y), seen + len(y)
                if step == total:
                    break
                if on_progress is not None:
                    on_progress(Progress(step, total, epoch, running / seen))
            val_acc = evaluate(model, dataset.val, device) if validate else None
            history.epochs.append({"epoch": epoch, "loss": running / seen, "val_acc": val_acc,
                                   "lr": schedule.get_last_lr()[0]})
            if snapshot is not None and step < total:
                snapshot.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                               "schedule": schedule.state_dict(), "generator": generator.get_state(), "step": step,
                               "epoch": epoch, "history": history.epochs, "layout": layout})
            if on_progress is not None:
                on_progress(Progress(step, total, epoch, running / seen, val_acc))
    history.seconds = time.perf_counter() - start
    return history


# --- the dense baseline ---------------------------------------------------------------------------


def slug(name: str) -> str:
    """A file-name-safe form of a model or dataset name (`tv:resnet18` -> `tv-resnet18`)."""
    return re.sub(r"[^A-Za-z0-9_.]+", "-", name.split("/")[-1] if name.startswith("imagefolder:") else name).strip("-")


def default_checkpoint(model_name: str, dataset_name: str) -> Path:
    return Path("checkpoints") / f"{slug(model_name)}-{slug(dataset_name)}" / "dense.pt"


def prepare(model_name: str, dataset_name: str, data_dir: Path | None = None, download: bool = False,
            image_size: int | None = None, weights: Path | None = None, seed: int = 0) -> tuple[nn.Module, data.Data]:
    """Model and data fitted to each other: data adapted to the model's input, model sized to the
    classes. `weights` come from a checkpoint whose recorded input side is used (`image_size` may
    only confirm it)."""
    spec = models.spec(model_name)
    if weights is not None:
        image_size = checkpoint.recorded_side(weights, image_size)
    dataset = data.load(dataset_name, data_dir, download, spec.in_channels, spec.min_size, image_size)
    torch.manual_seed(seed)
    model = models.create(model_name, num_classes=dataset.info.num_classes, in_channels=dataset.channels)
    if weights is not None:
        checkpoint.load_weights(model, weights, model_name)
    return model, dataset


@dataclass
class DenseResult:
    checkpoint: Path
    val_acc: float
    test_acc: float
    history: History


def train_dense(model_name: str, dataset_name: str, config: TrainConfig, device: torch.device,
                out: Path | None = None, data_dir: Path | None = None, download: bool = False,
                image_size: int | None = None, init: Path | None = None,
                on_progress: ProgressFn | None = None) -> DenseResult:
    """Train the dense baseline every later stage is measured against; write checkpoint + sidecar.
    An interrupted run leaves a snapshot beside `out` (`.resume.pt`) at each epoch's end; the same
    call continues from it."""
    model, dataset = prepare(model_name, dataset_name, data_dir, download, image_size, seed=config.seed)
    if init is not None:  # initial weights only: the side they were trained at does not bind this run
        checkpoint.load_weights(model, init, model_name)
    out = Path(out or default_checkpoint(model_name, dataset_name))
    snapshot = Snapshot(out.with_name(f"{out.stem}.resume.pt"), {
        "model": model_name, "data": dataset.describe(), "config": asdict(config), "init": str(init) if init else None})
    history = fit(model, dataset, config, device, on_progress=on_progress, snapshot=snapshot)
    test_acc = evaluate(model, dataset.test, device)
    checkpoint.save(out, model.cpu(), {
        "kind": "dense",
        "model": model_name,
        **dataset.describe(),
        "num_classes": dataset.info.num_classes,
        "accuracy": {"val": history.val_acc, "test": test_acc, "unit": "% top-1"},
        "epochs": config.epochs,
        "seed": config.seed,
        "train_config": asdict(config),
        "history": history.epochs,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "train_seconds": round(history.seconds, 2),
        "resumed_after_epoch": history.resumed_after,
        "initialised_from": str(init) if init else None,
        "versions": versions(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    })
    snapshot.path.unlink(missing_ok=True)
    return DenseResult(out, history.val_acc, test_acc, history)
