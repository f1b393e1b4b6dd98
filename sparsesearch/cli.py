"""The `sparsesearch` command: parses flags, calls the library, prints. Nothing else imports it."""

from __future__ import annotations

import dataclasses
import errno
import functools
import logging
import math
import os
import platform
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Column, Table

from . import data, folders, models
from .errors import UserError
from .sparsity import SparsityType

app = typer.Typer(help="Hardware-aware AutoML for structured sparsity in conv nets (StructADMM).",
                  no_args_is_help=True, pretty_exceptions_show_locals=False, add_completion=False)
console = Console()
F = TypeVar("F", bound=Callable[..., Any])


class _Notes(logging.Handler):
    """The library's notes (its `sparsesearch.*` loggers: a cache decoded, a cache it could not
    write) as plain lines; the library itself never prints."""

    def emit(self, record: logging.LogRecord) -> None:
        note = "[yellow]note[/]: " if record.levelno >= logging.WARNING else ""
        console.print(note + escape(record.getMessage()), highlight=False, soft_wrap=True)


_library_log = logging.getLogger("sparsesearch")
_library_log.addHandler(_Notes())
_library_log.setLevel(logging.INFO)


# Numeric options that must be > 0; every other one must be >= 0. All must be finite.
_POSITIVE = frozenset({"epochs", "batch_size", "lr", "admm_interval", "rho0", "rho_factor", "rho_max", "samples",
                       "image_size", "threads", "stale_after", "replicates"})
_RANGES = {"confidence": ("a probability between 0 and 1, e.g. 0.84", lambda v: 0 < v < 1),
           "max_acc_drop": ("a number of accuracy points from 0 to 100", lambda v: 0 <= v <= 100)}


def _check_numbers(options: dict[str, Any]) -> None:
    """Every numeric option of every command, checked in this one place before anything runs."""
    for name, value in options.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        flag, positive = f"--{name.replace('_', '-')}", name in _POSITIVE
        if name in _RANGES and not (math.isfinite(value) and _RANGES[name][1](value)):
            raise UserError(f"{flag} must be {_RANGES[name][0]}, got {value}")
        if not math.isfinite(value) or value < 0 or positive and value == 0:
            raise UserError(f"{flag} must be a finite number {'> 0' if positive else '>= 0'}, got {value}")


def _os_problem(e: OSError) -> str:
    """A file-system failure as what to do about it; files written before it are intact (atomic writes)."""
    place = e.filename or "a file"
    if e.errno == errno.ENOSPC:
        return f"no space left on the device holding {place}; free some and run again (earlier files are intact)"
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"cannot write {place} ({e.strerror}); pick a folder you can write or fix its permissions"
    return f"{place}: {e.strerror or e}"


def _one_line_errors(fn: F, interrupted: str = "interrupted: everything written so far is intact") -> F:
    """`fn` with its numeric options checked, user errors printed as one line (exit 2) and the
    machine's (a full disk, a folder it cannot write) too (exit 1), instead of a traceback unless
    $SPARSESEARCH_DEBUG is set, and Ctrl-C as `interrupted` (exit 130)."""

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            _check_numbers(kwargs)
            return fn(*args, **kwargs)
        except KeyboardInterrupt:
            typer.echo(interrupted, err=True)
            raise typer.Exit(130) from None
        except (UserError, OSError) as e:
            if os.environ.get("SPARSESEARCH_DEBUG"):  # the whole traceback, for a bug report
                raise
            user = isinstance(e, UserError)
            typer.echo(f"error: {e if user else _os_problem(e)}", err=True)
            raise typer.Exit(2 if user else 1) from None  # 1: the machine's fault, not the input's
        except Exception as e:  # a study storage failing under the run: a full disk, a lost server
            from .storage import failed_mid_run

            line = failed_mid_run(e)
            if line is None or os.environ.get("SPARSESEARCH_DEBUG"):
                raise
            typer.echo(f"error: {line}", err=True)
            raise typer.Exit(1) from None

    return run  # type: ignore[return-value]


RESUMABLE = "interrupted: run the same command to continue from the last finished ADMM period or retraining epoch"


def command(name: str | None = None, interrupted: str | None = None) -> Callable[[F], F]:
    """Register a command whose user errors print as one line (exit 2) instead of a traceback, and
    whose Ctrl-C says `interrupted` (default: everything written so far is intact)."""

    def register(fn: F) -> F:
        app.command(name)(_one_line_errors(fn, *([interrupted] if interrupted else [])))
        return fn

    return register


@contextmanager
def progress_bar(description: str) -> Iterator[Callable[..., None]]:
    """A bar with ETA; yields update(completed, total, status) for library progress callbacks. A call
    whose total differs from the last, or whose count went down, starts a new phase (a profile's
    layers, then its calibration plans): a bar of its own, whose ETA counts only its own pace. Where
    output is not a terminal (a log file), plain lines instead, so a long run's log shows it going."""
    if not console.is_terminal:
        yield _progress_lines(description)
        return
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[status]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=False) as bar:
        task, last = bar.add_task(description, total=None, status=""), {"at": None, "total": None}

        def update(completed: int, total: int, status: str = "") -> None:
            nonlocal task
            if last["at"] is not None and (total != last["total"] or completed < last["at"]):
                task = bar.add_task(description, total=total, completed=completed, status=status)
            elif last["at"] is None:  # a resumed job starts part-done: its rate counts from here, not from 0
                bar.reset(task, completed=completed, total=total, status=status)
            last.update(at=completed, total=total)
            bar.update(task, completed=completed, total=total, status=status)

        yield update


def _progress_lines(description: str, every_s: float = 30.0) -> Callable[..., None]:
    """update(completed, total, status) printing a line at each tenth of the work, at most every
    `every_s` seconds otherwise, and at the end: done/total, status, elapsed and ETA. A new phase
    (see `progress_bar`) counts its elapsed time and pace from its start."""
    start, last = time.monotonic(), {"at": -math.inf, "tenth": -1, "from": None, "total": None, "done": None}

    def update(completed: int, total: int | None, status: str = "") -> None:
        nonlocal start
        now = time.monotonic()
        if last["from"] is not None and (total != last["total"] or completed < last["done"]):
            start, last["from"], last["tenth"] = now, None, -1
        last.update(total=total, done=completed)
        if last["from"] is None:  # a resumed job starts part-done: its rate counts from here
            last["from"] = completed
        tenth = int(10 * completed / total) if total else -1
        if completed != total and tenth <= last["tenth"] and now - last["at"] < every_s:
            return
        last.update(at=now, tenth=tenth)
        elapsed = now - start
        done = completed - last["from"]
        eta = f", ETA {_clock(elapsed * (total - completed) / done)}" if total and 0 < done and completed < total else ""
        console.print(f"{description}: {completed}/{total or '?'}{' ' + status if status else ''} "
                      f"({_clock(elapsed)} elapsed{eta})", highlight=False, soft_wrap=True)

    return update


def _clock(seconds: float) -> str:
    minutes, s = divmod(int(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{s:02d}"


# --- options shared across commands ---------------------------------------------------------------

ModelOpt = Annotated[str, typer.Option("--model", "-m", help="Registry name, tv:NAME, timm:NAME or package.module:factory.")]
OwnModelOpt = Annotated[str | None, typer.Option(
    "--model", "-m", help="The model the study or checkpoint records, if it is a package.module:factory of yours "
                          "(allows importing it).")]
DatasetOpt = Annotated[str, typer.Option("--dataset", "-d", help="Dataset name or imagefolder:PATH.")]
DataDirOpt = Annotated[Path | None, typer.Option(help="Where the dataset's files live (default per dataset).")]
ImageSizeOpt = Annotated[int | None, typer.Option(
    help="Input side in pixels (default: what the checkpoint records, else the dataset's: 224 for image folders).")]
DeviceOpt = Annotated[str, typer.Option(help="cpu, cuda or cuda:N.")]
ThreadsOpt = Annotated[int | None, typer.Option(help="CPU threads for torch (default: torch's choice).")]
ChannelsLastOpt = Annotated[bool, typer.Option(
    "--channels-last", help="Run every network in channels-last memory format, weights and input, as a CPU "
    "deployment may (oneDNN's own layout; shape-wise layers gather fastest in it).")]


@command("models")
def list_models() -> None:
    """List the models: built-ins, torchvision classifiers and how to name your own."""
    table = Table("name", "input", "description", title="built-in models")
    for spec in models.builtin_specs():
        table.add_row(spec.name, f">= {spec.min_size}x{spec.min_size}, any channels", spec.summary)
    console.print(table)
    names = models.torchvision_names()
    console.print(f"[bold]torchvision classifiers[/] ({len(names)}, 3-channel input, upsized to each one's minimum):")
    console.print(", ".join(models.TV_PREFIX + n for n in names), soft_wrap=False)
    timm = models.timm_names()
    console.print(f"[bold]timm classifiers[/] ({len(timm)}, any channels; e.g. timm:resnet18, timm:efficientnet_b0, "
                  "timm:convnext_atto, timm:deit_tiny_patch16_224; see timm.list_models())" if timm else
                  "[bold]timm classifiers[/]: pip install 'sparsesearch[timm]' to name them as timm:NAME")
    console.print("[bold]your own:[/] package.module:factory — a function returning an nn.Module; "
                  "it receives num_classes and in_channels if it takes them.")


@command("datasets")
def list_datasets() -> None:
    """List the datasets and where each one's files are looked for."""
    table = Table(Column("name", no_wrap=True), "images", "classes", "dense epochs", "augmented", "description",
                  title="datasets")
    for d in data.DATASETS.values():
        table.add_row(d.name, f"{d.channels}x{d.size}x{d.size}", str(d.num_classes), str(d.epochs),
                      "yes" if d.augment else "no", d.summary)
    table.add_row("imagefolder:PATH", f"3x{data.IMAGEFOLDER_SIZE}x{data.IMAGEFOLDER_SIZE}", "sub-folders", "30", "yes",
                  "your images, one sub-folder per class")
    console.print(table)
    console.print(f"Fashion-MNIST is read from {data.FASHION_MNIST_SYSTEM_DIR} when Debian's dataset-fashion-mnist "
                  "is installed; other files from --data-dir (default ./data, or $SPARSESEARCH_DATA).")
    console.print("imagefolder:PATH reads PATH/CLASS/* (split 80/10/10) or PATH/train (90/10 train/validation) + "
                  f"PATH/val|test (test), at --image-size (default 224), decoded once into {folders.cache_dir()} "
                  f"(${folders.CACHE_ENV} moves it).")
    console.print("augmented: random crop (4 px padding below 64 px, random resized crop from 64 px) and horizontal "
                  "flip while training the dense baseline.")


@command(interrupted="interrupted: run the same command to continue from the last finished epoch")
def train(
    model: ModelOpt = "digits-cnn",
    dataset: DatasetOpt = "digits",
    epochs: Annotated[float | None, typer.Option(help="Epochs (default: the dataset's, see `datasets`).")] = None,
    batch_size: Annotated[int, typer.Option(help="Mini-batch size.")] = 64,
    lr: Annotated[float, typer.Option(help="Peak learning rate (cosine decay).")] = 0.05,
    weight_decay: Annotated[float, typer.Option(help="L2 weight decay.")] = 5e-4,
    seed: Annotated[int, typer.Option(help="Seed for initialisation and shuffling.")] = 0,
    device: DeviceOpt = "cpu",
    threads: ThreadsOpt = None,
    data_dir: DataDirOpt = None,
    download: Annotated[bool, typer.Option(help="Download torchvision datasets (needs network).")] = False,
    image_size: ImageSizeOpt = None,
    checkpoint: Annotated[Path | None, typer.Option(help="Start from these weights instead of random.")] = None,
    out: Annotated[Path | None, typer.Option(help="Checkpoint path (default checkpoints/MODEL-DATASET/dense.pt).")] = None,
) -> None:
    """Train the dense baseline and write a checkpoint plus its JSON sidecar."""
    from .runtime import resolve_device, set_threads
    from .train import TrainConfig, train_dense

    dev = resolve_device(device)
    n_threads = set_threads(threads)
    config = TrainConfig(epochs=epochs or data.info(dataset).epochs, batch_size=batch_size, lr=lr,
                         weight_decay=weight_decay, seed=seed)
    console.print(f"training [bold]{model}[/] on [bold]{dataset}[/] for {config.epochs:g} epochs "
                  f"({dev}, {n_threads} threads)")
    with progress_bar("train") as update:
        result = train_dense(model, dataset, config, dev, out, data_dir, download, image_size, checkpoint,
                             on_progress=lambda p: update(p.step, p.total, _status(p)))
    resumed = result.history.resumed_after
    console.print(f"accuracy: val {result.val_acc:.2f}%, test {result.test_acc:.2f}% "
                  f"({result.history.seconds:.1f} s training"
                  f"{f', continued after epoch {resumed} of an interrupted run' if resumed else ''})")
    console.print(f"checkpoint: {result.checkpoint} (+ {result.checkpoint.with_suffix('.json').name})")


def _status(p: Any) -> str:
    acc = f" val {p.val_acc:.1f}%" if p.val_acc is not None else ""
    return f"epoch {p.epoch} loss {p.loss:.3f}{acc}"


@command()
def layers(
    model: ModelOpt = "digits-cnn",
    dataset: DatasetOpt = "digits",
    data_dir: DataDirOpt = None,
    image_size: ImageSizeOpt = None,
) -> None:
    """List the prunable layers with their shapes, MACs and applicable sparsity types."""
    from .graph import couplings
    from .layers import trace
    from .train import prepare

    net, ds = prepare(model, dataset, data_dir, image_size=image_size)
    found = trace(net, ds.input_shape)
    group_of = {n: f"g{i}" for i, group in enumerate(couplings(net, ds.input_shape), 1) for n in group}
    headers = ("layer", "kind", "weight", "input", "output", "MACs", "types", "coupled")
    table = Table(*(Column(h, overflow="fold") for h in headers),
                  title=f"{model} on {dataset} ({'x'.join(map(str, ds.input_shape))} input)")
    for layer in found:
        table.add_row(layer.name, layer.kind + (f" g={layer.groups}" if layer.groups > 1 else ""),
                      "x".join(map(str, layer.weight_shape)), "x".join(map(str, layer.in_shape)),
                      "x".join(map(str, layer.out_shape)), f"{layer.macs:,}", _types(layer.types),
                      group_of.get(layer.name, ""))
    console.print(table)
    console.print("MACs per sample; types: all = filter, channel, shape, irregular, nm "
                  "(the classifier never takes filter); coupled: layers of one group share output "
                  "channels and take filter pruning together")
    console.print(f"{len(found)} prunable layers, {sum(layer.macs for layer in found):,} MACs per sample")


@command(interrupted=RESUMABLE)
def prune(
    checkpoint: Annotated[Path, typer.Option(help="Dense checkpoint (from `sparsesearch train`).")],
    plan: Annotated[str, typer.Option(help="Plan file (.json/.toml) or TYPE=RATE for all layers, e.g. filter=0.5.")],
    model: Annotated[str | None, typer.Option("--model", "-m", help="Registry name, tv:NAME or package.module:factory "
                                               "(default: the one the checkpoint's sidecar records).")] = None,
    dataset: Annotated[str | None, typer.Option("--dataset", "-d", help="Dataset name or imagefolder:PATH "
                                                 "(default: the one the checkpoint's sidecar records).")] = None,
    admm_epochs: Annotated[float, typer.Option(help="ADMM W-step epochs in all (fractions allowed).")] = 10,
    admm_interval: Annotated[float, typer.Option(help="Epochs between Z/U updates.")] = 0.25,
    rho0: Annotated[float, typer.Option(help="Initial ADMM penalty rho.")] = 1e-3,
    rho_factor: Annotated[float, typer.Option(help="rho multiplier at each Z/U update.")] = 1.3,
    rho_max: Annotated[float, typer.Option(help="Cap on rho.")] = 10.0,
    retrain_epochs: Annotated[float, typer.Option(help="Masked retraining epochs after hard pruning.")] = 5,
    lr: Annotated[float, typer.Option(help="Learning rate of each ADMM period and of retraining.")] = 0.01,
    batch_size: Annotated[int, typer.Option(help="Mini-batch size.")] = 64,
    seed: Annotated[int, typer.Option(help="Seed for shuffling.")] = 0,
    device: DeviceOpt = "cpu",
    threads: ThreadsOpt = None,
    data_dir: DataDirOpt = None,
    image_size: ImageSizeOpt = None,
    out: Annotated[Path | None, typer.Option(help="Output folder (default: beside the checkpoint).")] = None,
) -> None:
    """ADMM-train toward a sparsity plan, hard-prune, retrain with masks; write weights, plan, metrics."""
    from .admm import ADMMConfig, prune_checkpoint
    from .runtime import resolve_device, set_threads

    dev = resolve_device(device)
    set_threads(threads)
    config = ADMMConfig(admm_epochs, admm_interval, rho0, rho_factor, rho_max, retrain_epochs, lr, lr,
                        batch_size, seed=seed)
    out_dir = out or checkpoint.parent / f"pruned-{_plan_slug(plan)}"
    with progress_bar("prune") as update:
        result, path = prune_checkpoint(
            model, dataset, checkpoint, plan, config, dev, out_dir, data_dir,
            on_progress=lambda p: update(p.step, p.total, f"{p.phase} loss {p.loss:.3f}"), image_size=image_size)
    acc = result.accuracy
    console.print(f"test accuracy: dense {acc['dense']:.2f}%, hard-pruned {acc['hard_pruned']:.2f}%, "
                  f"after retraining {acc['final']:.2f}%{_resumed(result.resumed_at)}")
    if result.iterations:
        last = result.iterations[-1]
        console.print(f"ADMM: {last.total} iterations, final rho {last.rho:.3g}, primal residual {last.residual:.3f}")
    dense, kept = result.macs
    console.print(f"MACs per sample of the pruned layers' own kept rows/columns: {dense:,} -> {kept:,} "
                  f"({dense / max(kept, 1):.2f}x fewer; `sparsesearch compact` also counts freed inputs)")
    for why, names in _grouped({r["layer"]: r["runs_dense"] for r in result.layers if "runs_dense" in r}).items():
        console.print(f"[yellow]counted dense[/] ({len(names)} layers: {_fold(names)}): {why}")
    console.print(f"wrote {path}, {path.with_suffix('.json').name} and plan.json in {path.parent}")


@command("compact")
def compact_cmd(
    checkpoint: Annotated[Path, typer.Option(help="Pruned checkpoint (pruned.pt from `sparsesearch prune`).")],
    device: DeviceOpt = "cpu",
    batch_size: Annotated[int, typer.Option(help="Batch size of the timed input.")] = 1,
    threads: ThreadsOpt = None,
    data_dir: DataDirOpt = None,
    out: Annotated[Path | None, typer.Option(help="Folder for the compacted model (default: compacted/ beside the checkpoint).")] = None,
    model: OwnModelOpt = None,
    image_size: ImageSizeOpt = None,
    channels_last: ChannelsLastOpt = False,
) -> None:
    """Physically compact a pruned model, measure its latency beside the masked dense model, and
    write it: model.pt (+ model.json, for sparsesearch.load), TorchScript and ONNX."""
    import torch

    from .compact import compact_checkpoint
    from .export import write_all
    from .runtime import resolve_device, set_threads

    dev = resolve_device(device)
    n_threads = set_threads(threads)
    with console.status("compacting and timing (dense and compacted, interleaved rounds)"):
        m = compact_checkpoint(checkpoint, dev, batch_size, data_dir, model, image_size, channels_last)
    table = Table("", "dense", "compacted", "ratio", title=f"{checkpoint} on {dev}, batch {batch_size}, "
                  f"{n_threads} threads, {m.setting['layout']}, median of {m.setting['rounds']} rounds")
    table.add_row("params", f"{m.params['dense']:,}", f"{m.params['compacted']:,}",
                  f"{m.params['dense'] / m.params['compacted']:.2f}x fewer")
    table.add_row("MACs/sample (prunable layers)", f"{m.macs['dense']:,}", f"{m.macs['compacted']:,}",
                  f"{m.macs['dense'] / max(m.macs['compacted'], 1):.2f}x fewer")
    table.add_row("latency ms", f"{m.latency_ms['dense']:.3f} ±{m.spread['dense']:.0%}",
                  f"{m.latency_ms['compacted']:.3f} ±{m.spread['compacted']:.0%}", _speedup(m))
    console.print(table)
    kinds = ", ".join(f"{k}: {v}" for k, v in sorted(Counter(m.compacted.impl.values()).items()))
    console.print(f"implementations: {kinds}")
    for why, names in _grouped(m.compacted.left_dense).items():
        console.print(f"[yellow]left dense[/] ({len(names)} layers: {_fold(names)}): {why}")
    out_dir = out or checkpoint.parent / "compacted"
    example = torch.randn(1, *m.origin["input_shape"], device=next(m.compacted.model.parameters()).device)
    with console.status(f"writing the compacted model to {out_dir}"):
        done = write_all(out_dir, m.compacted, example, {**m.origin, "measured": {
            "latency_ms": m.latency_ms, "speedup": m.speedup, "params": m.params, "macs": m.macs, **m.setting}})
    console.print(f"wrote {', '.join(p.name for p in done.files.values())} in {out_dir} "
                  f"(load with sparsesearch.load('{done.files['state']}'))")
    for fmt, why in done.skipped.items():
        console.print(f"[yellow]{fmt} skipped[/]: {why}")
    for fmt, names in done.densified.items():
        if names:
            console.print(f"{fmt} holds {len(names)} sparse layers dense ({_fold(names)}): the format has no sparse kernel")


# --- profile: latency tables, the latency model and its validation --------------------------------

profile_app = typer.Typer(help="Latency tables of compact layers on this device, and their validation.")
app.add_typer(profile_app, name="profile")
DtypeOpt = Annotated[str, typer.Option(help="float32, float16 or bfloat16.")]
ProfileBatchOpt = Annotated[int, typer.Option(help="Batch size of the timed input (the profile holds one).")]


def _user_errors(fn: F) -> F:
    """As `command`, for the sub-commands of `profile`, whose Ctrl-C keeps every row measured."""
    return _one_line_errors(fn, "interrupted: every row measured so far is saved; run the same command to resume")


def _type_names(text: str) -> tuple[str, ...]:
    """--types as sparsity type names, each checked."""
    kinds = tuple(t.strip() for t in text.split(",") if t.strip())
    accepted = [t.value for t in SparsityType]
    for kind in kinds:
        if kind not in accepted:
            raise UserError(f"unknown sparsity type '{kind}' in --types; accepted: {', '.join(accepted)}")
    return kinds


def _floats(text: str, what: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{what} must be comma-separated numbers, e.g. 0,0.25,0.5; got '{text}'") from None


@profile_app.callback(invoke_without_command=True)
@_user_errors
def profile_cmd(
    ctx: typer.Context,
    model: ModelOpt = "digits-cnn",
    dataset: Annotated[str | None, typer.Option(help="Dataset whose input size to use (default: digits for "
                                                     "digits-cnn, cifar10's 32x32 otherwise).")] = None,
    device: DeviceOpt = "cpu",
    batch_size: ProfileBatchOpt = 1,
    threads: ThreadsOpt = None,
    rates: Annotated[str | None, typer.Option(help="Rate grid, comma-separated (default 0 to 0.9 by 0.1, and "
                                                   "0.95, the highest a search offers).")] = None,
    types: Annotated[str, typer.Option(help="Sparsity types, comma-separated.")] = "filter,channel,shape,irregular,nm",
    dtype: DtypeOpt = "float32",
    out: Annotated[Path | None, typer.Option(help="Profile file (default hardware_profiles/<device>-b<batch>-<dtype>.json).")] = None,
    image_size: ImageSizeOpt = None,
    channels_last: ChannelsLastOpt = False,
) -> None:
    """Time every prunable layer's compact forms on a grid of rates; add missing rows to the profile."""
    if ctx.invoked_subcommand is not None:
        return
    from .profiler.measure import DEFAULT_RATES, profile_model, target
    from .profiler.predictor import LatencyModel
    from .runtime import layout_of, resolve_device, set_threads

    dev = resolve_device(device)
    n_threads = set_threads(threads)
    kinds = _type_names(types)
    grid = _floats(rates, "--rates") if rates is not None else list(DEFAULT_RATES)
    if not all(0 <= r < 1 for r in grid):
        raise UserError(f"--rates must lie in [0, 1) (the fraction of groups removed); got {rates}")
    with console.status(f"tracing {model} and the dims each rate leaves"):
        tgt = target(model, dataset, image_size)
    layout = layout_of(channels_last)
    console.print(f"profiling [bold]{model}[/] ({'x'.join(map(str, tgt.input_shape))} input) on {dev}, "
                  f"batch {batch_size}, {dtype}, {layout}, {n_threads} threads")
    with progress_bar("profile") as update:
        run = profile_model(tgt, dev, batch_size, dtype, grid, kinds, out, on_progress=update, layout=layout)
    console.print(f"{run.measured} rows measured, {run.reused} already in the profile, {run.seconds:.0f} s; "
                  f"{len(run.profile.rows)} rows in {run.path}")
    if run.skipped:
        console.print(f"{run.skipped} grid points not timed: their type ran no faster than the dense layer at its "
                      "highest rate (or ran the dense layer itself), and runs slower at lower rates; the search "
                      "does not offer it there")
    if run.refreshed:
        console.print(f"timed anew: the rows of {', '.join(run.refreshed)}, changed since the profile timed them, "
                      "and this network end to end")
    if run.dropped:
        console.print(f"[yellow]dropped[/] from the profile: {', '.join(run.dropped)}, timed end to end on the old "
                      "kernel; `sparsesearch profile --model NAME` (with its --dataset) times them again")
    table = Table("layers", "dense ms", title="slowest layers (dense, median per call)")
    for names, ms in run.slowest:
        table.add_row(names, f"{ms:.4f}")
    console.print(table)
    rest = run.rest
    console.print(f"rest of the network (not prunable layers): {rest['median_ms']:.4f} ms; "
                  f"dense network measured: {rest['dense_ms']:.4f} ms")
    for kind, verdict in run.profile.verdicts().items():
        console.print(f"{kind}: {verdict}")
    found = run.profile.steps
    console.print(f"channel steps on this device ({found['conv']}): latency steps every {found['out']} output and "
                  f"every {found['in']} input channels (1: no staircase)")
    if run.speeds:
        console.print(f"machine speed while profiling (yardstick time over its reference): "
                      f"{min(run.speeds):.2f}-{max(run.speeds):.2f}x; latencies are scaled to the reference")
    if run.unsteady > 0.1:
        console.print(f"[yellow]{run.unsteady:.0%} of the timing runs found this machine more than 10% off its "
                      "reference speed even when timed again (other load, or threads that flip between two speeds); "
                      "run the profile alone, or with fewer --threads, and compare with `profile validate`[/]")
    with console.status("fitting the latency model"):
        fitted = LatencyModel().fit(run.profile)
    cv = fitted.cv_error
    console.print(f"latency model, {cv['folds']}-fold cross-validated on {cv['rows']} rows: mean |error| "
                  f"{cv['mean_abs']:.1%}, median {cv['median_abs']:.1%}, {cv['within_10']:.0%} of rows within ±10%")
    fit = fitted.in_network(tgt.model, tgt.input_shape)
    reads = "".join(f" + {ms:.4f} x ({family} layers' inputs)" for family, ms in fit.per_minput.items())
    kernels = "".join(f" + {k:.3f} x ({family} layers)" for family, k in fit.per_ms.items())
    calls = f" + {fit.per_call:.4f} ms x (layers that run)" if fit.per_call else ""
    console.print(f"in network: latency = {fit.offset:.4f} ms + {fit.slope:.3f} x (sum of isolated layers)"
                  f"{kernels}{calls} + ms per million of: {fit.per_mweight:.4f} x (weights kept) + {fit.per_moutput:.4f} x "
                  f"(outputs){reads}; fitted on {fit.plans} plans timed end to end")


@profile_app.command("validate")
@_user_errors
def profile_validate(
    model: ModelOpt = "digits-cnn",
    dataset: Annotated[str | None, typer.Option(help="Dataset whose input size to use (as for profile).")] = None,
    samples: Annotated[int, typer.Option(help="Random per-layer plans to measure.")] = 30,
    device: DeviceOpt = "cpu",
    batch_size: ProfileBatchOpt = 1,
    threads: ThreadsOpt = None,
    dtype: DtypeOpt = "float32",
    profile: Annotated[Path | None, typer.Option(help="Profile file (default: the one matching this device).")] = None,
    allow_foreign_profile: Annotated[bool, typer.Option(help="Use a profile measured on another device or setting.")] = False,
    seed: Annotated[int, typer.Option(help="Seed of the random plans.")] = 0,
    out: Annotated[Path | None, typer.Option(help="Scatter plot PNG (default bench/results/validate-<model>-<profile>.png).")] = None,
    image_size: ImageSizeOpt = None,
    channels_last: ChannelsLastOpt = False,
) -> None:
    """Compact random plans, time them end to end, and compare with the latency model's prediction
    (in the memory layout the profile was measured in)."""
    from .files import write_json
    from .profiler.measure import target
    from .profiler.predictor import LatencyModel
    from .profiler.table import DTYPES, load_profile, slug
    from .profiler.validate import scatter, validate
    from .runtime import layout_of, resolve_device, set_threads

    dev = resolve_device(device)
    n_threads = set_threads(threads)
    if samples < 1:
        raise UserError(f"--samples must be at least 1, got {samples}")
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype '{dtype}'; accepted: {', '.join(DTYPES)}")
    if dtype != "float32":
        raise UserError(f"validate compacts models with `compact`, which runs float32 only for now; "
                        f"validate a float32 profile (got --dtype {dtype})")
    loaded = load_profile(profile, dev, batch_size, dtype, allow_foreign_profile,
                          layout=layout_of(channels_last))
    with console.status(f"fitting the latency model on {loaded.path}"):
        fitted = LatencyModel().fit(loaded)
    tgt = target(model, dataset, image_size)
    console.print(f"validating on [bold]{model}[/] ({'x'.join(map(str, tgt.input_shape))} input), {dev}, "
                  f"batch {batch_size}, {dtype}, {loaded.fingerprint.get('layout', 'contiguous')}, {n_threads} "
                  f"threads; profile {loaded.path}")
    with progress_bar("validate") as update:
        result = validate(fitted, tgt, samples, dev, batch_size, DTYPES[dtype], seed, on_progress=update)
    png = out or Path("bench/results") / f"validate-{slug(model)}-{Path(str(loaded.path)).stem}.png"
    scatter(result, png)
    write_json(png.with_suffix(".json"), result.to_dict())
    console.print(f"{len(result.random)} random plans (median of interleaved rounds, {n_threads} threads): "
                  f"latency mean |predicted/measured - 1| {result.mean_abs_error:.1%}, {result.within_10:.0%} within "
                  f"±10%; speedup over the dense network {result.speedup_mean_abs_error:.1%}, "
                  f"{result.speedup_within_10:.0%} within ±10%")
    if removing := result.removing:
        counts = sorted({s.removed for s in removing})
        span = "-".join(map(str, dict.fromkeys((counts[0], counts[-1]))))
        console.print(f"{len(removing)} of them remove {span} residual branches whole: speedup mean |error| "
                      f"{result.removing_speedup_mean_abs_error:.1%}, {result.removing_speedup_within_10:.0%} within "
                      "±10%")
    if result.ladder:
        console.print("uniform filter ladder, the search's baselines (predicted / measured speedup): " + ", ".join(
            f"{s.kind.split()[-1]}: {s.predicted_speedup:.2f}x / {s.measured_speedup:.2f}x" for s in result.ladder))
    if abs(result.drift - 1) > 0.1:
        console.print(f"[yellow]the dense network now runs at {result.drift:.2f}x its profiled latency: this machine "
                      "is not in the state it was profiled in (other load, another thread regime); latencies in ms "
                      "are off by that much, speedups are not[/]")
    console.print(f"wrote {png} and {png.with_suffix('.json').name}")


# --- optimize, report, export: the Optuna study -------------------------------------------------

StudyArg = Annotated[str, typer.Argument(help="Study name (a folder under studies/).")]
StorageOpt = Annotated[str | None, typer.Option(
    help="Optuna storage: sqlite:///PATH (default studies/NAME/study.db), postgresql://USER@HOST/DB, journal:///PATH.")]
ArtifactsOpt = Annotated[str | None, typer.Option(
    help="Where the study keeps trial weights: a folder all workers reach, or s3://BUCKET (default: the study's, "
         "else studies/NAME/artifacts).")]


@command()
def optimize(
    budget: Annotated[str, typer.Option(help="Trials in the study (e.g. 20), or a duration for this run (30m, 2h).")] = "20",
    model: Annotated[str | None, typer.Option("--model", "-m", help="Model (default digits-cnn).")] = None,
    dataset: Annotated[str | None, typer.Option("--dataset", "-d", help="Dataset (default digits).")] = None,
    checkpoint: Annotated[Path | None, typer.Option(help="Dense checkpoint (default checkpoints/MODEL-DATASET/dense.pt, trained if missing).")] = None,
    max_acc_drop: Annotated[float | None, typer.Option(help="Feasible: at most this many points of validation accuracy below dense (default 1.0).")] = None,
    types: Annotated[str | None, typer.Option(help="Sparsity types to search, comma-separated (default all).")] = None,
    study: Annotated[str | None, typer.Option(help="Study name (default MODEL-DATASET); the same name resumes it.")] = None,
    storage: StorageOpt = None,
    trial_epochs: Annotated[str | None, typer.Option(help="ADMM+RETRAIN epochs per trial (default 0+4: pruned at "
                                                          "once, the slim network trained 4 epochs; 1+3: ADMM "
                                                          "first).")] = None,
    trial_data: Annotated[float | None, typer.Option(help="Fraction of the training split each trial trains on: a "
                                                          "fixed stratified subset (default 1). Trials always "
                                                          "validate on the whole validation split.")] = None,
    full_epochs: Annotated[str | None, typer.Option(help="ADMM+RETRAIN epochs of the study's full runs, on the whole "
                                                         "training split: those promoted during the search, "
                                                         "finalize's and export's (default 0+15; 10+5 where trials "
                                                         "run ADMM).")] = None,
    full_runs: Annotated[float, typer.Option(help="Share of this run's time spent retraining front plans at the "
                                                  "full budget between trials (the plans finalize's bisection "
                                                  "asks for, counted by it later), so the rest of the search "
                                                  "judges trials at the limit they show trials overstate; on top "
                                                  "of a count of trials; 0: none.")] = 0.25,
    batch_size: Annotated[int | None, typer.Option(help="Batch size of the predicted and measured latency (default 1).")] = None,
    sampler: Annotated[str | None, typer.Option(help="tpe (default) or random.")] = None,
    channels_last: Annotated[bool, typer.Option(
        "--channels-last", help="Profile, predict and measure every network in channels-last memory format, as "
        "a CPU deployment may run them (a study keeps the layout it began with).")] = False,
    seed: Annotated[int | None, typer.Option(help="Seed of the sampler and of training (default 0).")] = None,
    precision: Annotated[str | None, typer.Option(
        help="float32 (default) or bfloat16: the precision every training step of the study runs in (trials, "
        "control, finalize's full runs); bfloat16 trains 1.7-2.5x faster on CPUs with AMX or AVX512-BF16.")] = None,
    device: DeviceOpt = "cpu",
    threads: ThreadsOpt = None,
    profile: Annotated[Path | None, typer.Option(help="Latency profile (default: this device's under hardware_profiles/, measured if missing).")] = None,
    allow_foreign_profile: Annotated[bool, typer.Option(help="Use a profile measured on another device or setting.")] = False,
    data_dir: DataDirOpt = None,
    image_size: ImageSizeOpt = None,
    artifacts: ArtifactsOpt = None,
    stale_after: Annotated[int, typer.Option(help="Seconds a worker may fall silent before its trial is failed and retried.")] = 120,
) -> None:
    """Search per-layer sparsity plans with Optuna: accuracy vs predicted speedup under an accuracy
    constraint; then measure the Pareto front on this device and write the report. Start it on any
    number of machines with one --storage and --study: they share one search."""
    import signal

    import optuna

    from . import report as reporting
    from . import search, seeds, storage as stores
    from .runtime import layout_of, resolve_device, set_threads
    from .space import LadderPruner
    from .train import check_precision, slug

    dev = resolve_device(device)
    n_threads = set_threads(threads)
    limit = search.parse_budget(budget)
    admm_epochs, retrain_epochs = search.parse_epochs(trial_epochs) if trial_epochs else (None, None)
    kinds = _type_names(types) if types else None
    if sampler not in (None, "tpe", "random"):
        raise UserError(f"--sampler must be tpe or random, got '{sampler}'")
    if trial_data is not None and not 0 < trial_data <= 1:
        raise UserError(f"--trial-data must be a fraction in (0, 1] of the training split, got {trial_data}")
    if not 0 <= full_runs < 1:
        raise UserError(f"--full-runs must be a share of the run's time in [0, 1), got {full_runs}")
    full = search.epochs_text(*search.parse_epochs(full_epochs, "--full-epochs")) if full_epochs else None
    if precision is not None:
        check_precision(precision)
    if model:  # a typo must not leave a study behind
        models.spec(model)
    if dataset:
        data.info(dataset)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    name = study or f"{slug(model or 'digits-cnn')}-{slug(dataset or 'digits')}"
    opened = stores.open_study(name, storage, create=True, grace_s=stale_after)
    given = {"model": model, "dataset": dataset, "checkpoint": str(checkpoint) if checkpoint else None, "types": kinds,
             "max_acc_drop": max_acc_drop, "admm_epochs": admm_epochs, "retrain_epochs": retrain_epochs,
             "trial_data": trial_data, "full_epochs": full,
             "batch_size": batch_size, "image_size": image_size, "seed": seed, "sampler": sampler,
             "layout": layout_of(True) if channels_last else None, "precision": precision}
    try:
        config = search.reconcile(opened, given, search.SearchConfig())
        models.recorded(config.model, model, f"study '{name}'")
        done_before = len(search.trained_trials(opened))
        url, kept = stores.storage_url(name, storage), stores.artifacts_location(opened, artifacts)
        console.print(f"study [bold]{name}[/] ({url}): {config.model} on {config.dataset}, {done_before} trials so "
                      f"far; budget {limit}; {dev}, {n_threads} threads; worker {stores.worker()}")
        if stores.shared(url) and not artifacts and "://" not in kept:
            console.print(f"[yellow]note:[/] trial weights go to {kept} on this machine; workers on other machines "
                          "need --artifacts DIR on a folder they all mount (or s3://BUCKET)")
        with progress_bar("setup") as update:
            built = search.build(config, dev, kept, data_dir, profile,
                                 allow_foreign_profile, notify=lambda text: console.print(f"[yellow]note:[/] {text}"),
                                 on_progress=lambda phase, d, t, s: update(d, t, f"{phase} {s}"))
        with console.status("recording the study's space: compacting the dense model to find the residual "
                            "branches it may remove whole"):
            search.record(opened, built)
    except BaseException:  # a refused or interrupted set-up leaves no empty study behind
        stores.discard_if_unused(opened, storage)
        raise
    if built.foreign:
        console.print(f"[yellow]note:[/] trials are scored by the profile of another device ({built.foreign[0]}"
                      f"{' ...' if len(built.foreign) > 1 else ''}): the front is measured there, with "
                      f"`sparsesearch measure {name}`")
    opened.sampler = search.make_sampler(config, done_before)
    opened.pruner = LadderPruner()
    console.print(f"dense: {built.dense['val']:.2f}% val, {built.dense['test']:.2f}% test; "
                  f"{built.dense_ms:.3f} ms per batch of {config.batch_size} (profiled, {config.layout}); space: "
                  f"{len(built.space.slots)} slots, {opened.user_attrs['space']}"
                  + (f"; {len(built.removable)} layers or residual branches it may remove whole"
                     if built.removable else ""))
    started = time.monotonic()  # a duration budget counts the control, as it counts the sensitivity scan
    with progress_bar("control") as update:
        search.control(built, opened, lambda p: update(p.step, p.total, p.phase))
    if control := opened.user_attrs.get(search.CONTROL):
        console.print(f"control (the trial recipe, nothing pruned): {control['val']:.2f}% val "
                      f"({control['val'] - built.dense['val']:+.2f} vs dense, {search.duration(control['seconds'])}); "
                      f"feasible: at most {config.max_acc_drop:g} points below it, image by image")
    elif holder := (opened.user_attrs.get(search.TRAINING_CONTROL) or {}).get("by"):
        console.print(f"control: worker {holder} trains it; this worker trains trials meanwhile and judges each "
                      f"against it (at most {config.max_acc_drop:g} points below it, image by image)")
    else:
        console.print(f"feasible: at most {config.max_acc_drop:g} points below the dense model, image by image "
                      "(this study's first trials were judged so, before studies had a control)")
    if (raised := search.trial_limit(opened, config.max_acc_drop)) > config.max_acc_drop:
        console.print(f"trials may lose up to {raised:.2f} points: full runs of this study's plans (finalize) came "
                      f"within {config.max_acc_drop:g} after trials that lost that much")
    with progress_bar("sensitivity scan") as update:
        scan = search.sensitivity(built, opened, update)
    fragile, floor = max(scan.drop.items(), key=lambda kv: kv[1]), seeds.noise(scan)
    quiet = sum(d <= floor for d in scan.drop.values())
    console.print(f"sensitivity scan: {len(scan.drop)} slots each pruned alone at {scan.rate:g} without training, "
                  f"{search.duration(scan.seconds)} ({scan.images:,} probe images); {quiet} lost no more than its "
                  f"noise ({floor:.1f} points, the largest gain a slot showed), most fragile {fragile[0]} "
                  f"({fragile[1]:.1f} points lost); the study starts from its plans next to the uniform ones")
    if scan.removed:
        cheap = sum(d <= floor for d in scan.removed.values())
        console.print(f"layers or residual branches removed alone: {len(scan.removed)}, {cheap} within the noise, the "
                      f"most costly {max(scan.removed.values()):.1f} points; a trial removes the cheapest first")
    if unprofiled := built.unprofiled:
        untimed = sorted(k.value for k in unprofiled)
        console.print(f"[yellow]not searched[/]: {', '.join(untimed)} (the profile has not timed them on this network; "
                      f"`{built.profile_command}` adds them)")
    if counts := Counter(kind.value for kinds in built.withheld.values() for kind in kinds - unprofiled):
        console.print("withheld (no faster than the dense layer even at the highest rate, as timed or predicted on "
                      "the profile the study started with): "
                      + ", ".join(f"{kind} on {_count(n, 'layer')}" for kind, n in sorted(counts.items())))
    cost = search.trial_cost(built)
    left = (limit.seconds or 0) - (time.monotonic() - started)
    more = max((limit.trials or 0) - done_before, 0)
    buys = (f"the {search.duration(left)} left of {limit} buy ≥ {left / cost.seconds:.0f} trials" if not limit.trials
            else f"{more} more trials ≤ {search.duration(cost.seconds * more)}" if more
            else f"the study already has {done_before} trials (--budget {limit.trials}); a larger --budget adds more")
    share = search.trial_share(built.config)
    console.print(f"one trial on {len(built.trial_data.train):,} training images ({share:.1%} of a full run's"
                  f"{', in ' + built.config.precision if built.config.precision != 'float32' else ''}): "
                  f"{cost} on this device (timed on a few steps); {buys}"
                  + (", more for trials stopped early" if not limit.trials else ""))
    needed = search.faithful_share(built)
    if share < needed * (1 - 1e-9):
        enough = search.faithful_config(built.config, needed)
        why = ("plans that remove residual blocks recover late: resnet56's ranked as full runs did at 16.7%, "
               "not at 6.7%" if built.space.removable else "LeNet-5: Spearman 0.56 at 2.7%, 0.92 at 5.3%")
        flags = [f"--trial-data {enough.trial_data:g}"] if enough.trial_data != built.config.trial_data else []
        if (enough.admm_epochs, enough.retrain_epochs) != (built.config.admm_epochs, built.config.retrain_epochs):
            flags.append(f"--trial-epochs {search.epochs_text(enough.admm_epochs, enough.retrain_epochs)}")
        console.print(f"[yellow]cheap trials[/]: under {needed:.0%} of a full run's training images, trials may rank "
                      f"plans unlike full training ({why}); {' '.join(flags)} trains {search.trial_share(enough):.1%}")
    promotion = _promotion(built, opened, limit, full_runs) if full_runs else None
    stop = {"asked": False}

    def interrupt(_sig: int, _frame: Any) -> None:
        if stop["asked"]:
            raise KeyboardInterrupt
        stop["asked"] = True
        console.print("[yellow]stopping after the current trial or full run[/] (Ctrl-C again to stop now; a full "
                      "run goes on from where it stopped, in `finalize` or the next `optimize`)")

    previous = signal.signal(signal.SIGINT, interrupt)
    try:
        with progress_bar("search") as update:
            def on_trial(st: Any, _trial: Any) -> None:
                within = search.trial_limit(st, config.max_acc_drop)  # full runs may have raised it
                best = search.best_promising_speedup(st, within)
                judged = ("feasible" if within == config.max_acc_drop
                          else f"within the trial limit ({within:.2f} points)")
                pace = search.seconds_per_trial(st)
                status = ((f"best {judged} {best:.2f}x (predicted)" if best else f"no {judged} trial yet")
                          + (f", {search.duration(pace)}/trial" if pace else ""))
                trained = len(search.trained_trials(st))
                if limit.trials:
                    update(trained, max(limit.trials, trained), status)
                else:  # a duration: the bar is the minutes of it spent
                    update(int((time.monotonic() - started) / 60), math.ceil(limit.seconds / 60),
                           f"min; {trained - done_before} trials, {status}")

            on_trial(opened, None)
            if promotion:
                promotion.on_run = lambda trial, now: _promoted(trial, now, update)
            ran = search.run(built, opened, limit, on_trial, lambda: stop["asked"], started=started, promote=promotion)
    finally:
        signal.signal(signal.SIGINT, previous)
    console.print(f"{ran.trained} trials trained, {ran.rejected} candidates rejected before training "
                  "(predicted slower than dense, or dominated); see each trial's 'rejected' attr"
                  + (f"; {_count(ran.promoted, 'full run')} between them" if promotion else ""))
    if ran.stopped == "asked":
        console.print(f"interrupted: {len(search.trained_trials(opened))} trials saved in {name}; run the same "
                      "command to resume")
        raise typer.Exit(130)
    if ran.stopped == "rejections":
        console.print("[yellow]note:[/] the sampler kept proposing plans predicted slower than dense; "
                      "narrow --types (e.g. filter,channel) for this device")
    stores.fail_stale(opened)
    busy = opened.get_trials(False, states=(optuna.trial.TrialState.RUNNING,))
    if busy and not built.foreign:
        console.print(f"[yellow]note:[/] {_count(len(busy), 'trial')} still running in other workers "
                      f"({_fold(sorted({str(t.user_attrs.get('worker', '?')) for t in busy}))}); the last worker to "
                      f"finish measures the front (or run `sparsesearch measure {name}`)")
    elif not built.foreign:  # a front scored for another device is measured there, by `sparsesearch measure`
        _measure(built, opened, f"{dev}, batch {config.batch_size}, {n_threads} threads")
    console.print("wrote " + ", ".join(str(p) for p in reporting.write(opened, stores.study_dir(name))))
    console.print(f"next: `sparsesearch finalize {name}` retrains the front at the full budget (a few plans, by "
                  "bisection) and exports the fastest plan within the limit, judged retrained")


def _promotion(built: Any, opened: Any, limit: Any, share: float) -> Any:
    """The full runs `optimize` promotes between trials (`finalize.Promotion`), with what one costs
    here and how many the budget holds said first."""
    from . import search, storage as stores
    from .finalize import Promotion

    config = built.config
    epochs = search.full_epochs(config)
    done_at = search.epochs_text(*epochs)
    one = search.full_run_cost(built, *epochs)
    holds = (f"at least {int(share * limit.seconds // one.seconds)} fit in {share:.0%} of {limit}" if limit.seconds
             else f"up to {share:.0%} of the time its trials take")
    console.print(f"full runs between trials ({done_at} epochs on {len(built.data.train):,} images; the plans "
                  f"finalize's bisection asks for, so trials are judged at the limit they show): one is {one} on "
                  f"this device (timed on a few steps of the dense network; a plan's run trains its slim network, "
                  f"priced by its trial before it starts); {holds}")
    if limit.seconds and one.seconds > share * limit.seconds:
        console.print(f"[yellow]note:[/] a full run of the dense network would not fit in {share:.0%} of {limit}: "
                      "only plans that prune enough to fit are retrained, and trials are judged at the limit earlier "
                      "full runs support; a longer --budget, a larger --full-runs or fewer --full-epochs (a new "
                      "study) leaves more room")

    def on_done(trial: int, result: Any) -> None:
        console.print(_outcome(opened, trial, result, config.max_acc_drop, 0.5, done_at) + "; trials may now lose "
                      f"up to {search.trial_limit(opened, config.max_acc_drop):.2f} points")

    return Promotion(built, config.max_acc_drop, epochs, stores.study_dir(opened.study_name) / "export", share,
                     one.seconds, on_done=on_done)


def _promoted(trial: int, now: Any, update: Callable[..., None]) -> Callable[[int, int, str], None]:
    """A promoted full run's first line, and its progress on the search's bar (a phase of its own)."""
    console.print(_run_line(trial, now))
    return lambda done, total, phase: update(done, total, f"full run, trial {trial}: {phase}")


def _run_line(trial: int, now: Any) -> str:
    """The line a full run starts with: which plan of the front, and whether it is a close call's replicate."""
    from . import report as reporting

    again = now.replicate(trial)
    what = (f"run {again + 1} of trial {trial} at another seed, its verdict a close call "
            f"({reporting.retrained_text(now.retrained[trial])})" if again else f"trial {trial}")
    return (f"full run: {what}, plan {now.front.index(trial) + 1} of the {len(now.front)} on the trials' front "
            f"(slowest first); {len(now.retrained)} retrained so far"
            + (f", other workers on {_fold([str(n) for n in now.busy])}" if now.busy else ""))


def _measure(trials: Any, study: Any, setting: str, again: bool = False) -> None:
    """Measure the study's front on this device and print it; another worker measuring it is a note."""
    from . import report as reporting
    from .errors import Busy

    try:
        with progress_bar("measure front") as update:
            measured = reporting.measure_front(trials, study, update, again)
    except Busy as e:
        console.print(f"[yellow]note:[/] {e}")
        return
    table = Table("trial", "val %", "drop ± SE", "predicted", "measured", "plan",
                  title=f"Pareto front of {study.study_name} (speedup end to end on {setting})")
    for t in reporting.front(study):
        m = measured.get(str(t.number), {})
        table.add_row(f"{t.number}{' ' + t.user_attrs['baseline'] if 'baseline' in t.user_attrs else ''}",
                      f"{t.user_attrs['val_acc']:.2f}", reporting.drop_text(reporting.row(t, {})),
                      f"{t.values[1]:.2f}x", f"{m['measured_speedup']:.2f}x" if m else "-",
                      reporting._plan_text(t.user_attrs["plan"]))
    console.print(table)


@command("measure")
def measure_cmd(
    study: StudyArg,
    storage: StorageOpt = None,
    artifacts: ArtifactsOpt = None,
    batch_size: Annotated[int | None, typer.Option(help="Batch size (default: the study's).")] = None,
    again: Annotated[bool, typer.Option(help="Measure every plan again, even those measured on this device.")] = False,
    model: OwnModelOpt = None,
    device: DeviceOpt = "cpu",
    threads: ThreadsOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Compact and time a study's Pareto plans and uniform baselines on this device (the target),
    beside their masked dense forms, and write the report. Needs the study's storage and trial
    weights, not its data or dense checkpoint."""

    import optuna

    from . import report as reporting
    from . import search, storage as stores
    from .runtime import resolve_device, set_threads

    dev = resolve_device(device)
    n_threads = set_threads(threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    opened = stores.open_study(study, storage, create=False)
    models.recorded(search.load_config(opened).model, model, f"study '{study}'")
    trials = search.trials_of(opened, dev, stores.artifacts_location(opened, artifacts), data_dir)
    if batch_size is not None:
        trials.config = dataclasses.replace(trials.config, batch_size=batch_size)
    _measure(trials, opened, f"{dev}, batch {trials.config.batch_size}, {n_threads} threads", again)
    console.print("wrote " + ", ".join(str(p) for p in reporting.write(opened, stores.study_dir(study))))


@command("report")
def report_cmd(study: StudyArg, storage: StorageOpt = None) -> None:
    """Write the Pareto set, plots and report.md of a study into studies/STUDY/."""
    import optuna

    from . import report as reporting
    from . import search, storage as stores

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    opened = stores.open_study(study, storage, create=False)
    search.load_config(opened)
    unmeasured = [t.number for t in reporting.front(opened) if str(t.number) not in opened.user_attrs.get("measured", {})]
    paths = reporting.write(opened, stores.study_dir(study))
    if unmeasured:
        console.print(f"[yellow]note:[/] Pareto trials {_fold([str(n) for n in unmeasured])} are not measured yet; "
                      f"`sparsesearch measure {study}` measures them on the device it runs on")
    console.print("wrote " + ", ".join(str(p) for p in paths))


@command("export", interrupted=RESUMABLE)
def export_cmd(
    study: StudyArg,
    trial: Annotated[int, typer.Option(help="Trial number (see studies/STUDY/pareto.json).")],
    epochs: Annotated[str | None, typer.Option(help="ADMM+RETRAIN epochs of the full run (default: the study's "
                                                    "--full-epochs, else 0+15; 10+5 where the study's trials run "
                                                    "ADMM: --trial-epochs 1+3).")] = None,
    out: Annotated[Path | None, typer.Option(help="Output folder (default "
                                                  "studies/STUDY/export/trial-N-EPOCHS).")] = None,
    storage: StorageOpt = None,
    artifacts: ArtifactsOpt = None,
    model: OwnModelOpt = None,
    device: DeviceOpt = "cpu",
    threads: ThreadsOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Re-run a trial's plan with the full ADMM + retraining budget, compact, measure, and write the
    compacted model (model.pt + model.json, TorchScript, ONNX) with metrics.json."""
    from . import report as reporting, search, storage as stores

    opened = _study_of(study, storage, model)
    judged = any(r["trial"] == trial for r in reporting.exported(opened))  # by finalize: beyond the limit or not
    searched = search.chosen(opened, trial, within_trial_limit=not judged)
    admm_epochs, retrain_epochs = search.full_epochs(search.load_config(opened), epochs)
    built, dev, n_threads = _rebuilt(opened, device, threads, artifacts, data_dir)
    config = built.config
    out_dir = out or search.export_dir(stores.study_dir(study) / "export", trial,
                                       search.epochs_text(admm_epochs, retrain_epochs))
    with progress_bar(f"trial {trial}: ADMM {admm_epochs:g} + retrain {retrain_epochs:g} epochs") as update:
        result = search.export_trial(built, opened, trial, admm_epochs, retrain_epochs, out_dir, update,
                                     within_trial_limit=not judged)
    acc = result.accuracy
    console.print(f"accuracy: val {acc['val']:.2f}%, test {acc['test']:.2f}% (dense {acc['dense_val']:.2f}% / "
                  f"{acc['dense_test']:.2f}%){_resumed(result.resumed_at)}")
    console.print(f"retrained: {acc['dense_val'] - acc['val']:.2f} points of validation accuracy below the dense "
                  f"model; its trial: {reporting.drop_text(searched.user_attrs)} below the control")
    m = result.measured
    console.print(f"latency {m.latency_ms['dense']:.3f} -> {m.latency_ms['compacted']:.3f} ms "
                  f"({dev}, batch {config.batch_size}, {n_threads} threads, medians of interleaved rounds): "
                  f"{_speedup(m)}; MACs {m.macs['dense']:,} -> {m.macs['compacted']:,}; params "
                  f"{m.params['dense']:,} -> {m.params['compacted']:,}")
    for fmt, why in result.skipped.items():
        console.print(f"[yellow]{fmt} skipped[/]: {why}")
    console.print(f"wrote {', '.join(p.name for p in result.files.values())} and {result.metrics.name} in {out_dir}")


@command("finalize", interrupted=RESUMABLE)
def finalize_cmd(
    study: StudyArg,
    max_acc_drop: Annotated[float | None, typer.Option(help="Ship the fastest plan at most this many points of "
                                                            "validation accuracy below dense, retrained (default: the "
                                                            "study's limit).")] = None,
    epochs: Annotated[str | None, typer.Option(help="ADMM+RETRAIN epochs of each full run (default: the study's "
                                                    "--full-epochs, else 0+15; 10+5 where the study's trials run "
                                                    "ADMM: --trial-epochs 1+3).")] = None,
    retrains: Annotated[int | None, typer.Option(help="Stop after this many full runs in this call (default: until "
                                                      "the bisection settles, about log2 of the front).")] = None,
    confidence: Annotated[float, typer.Option(help="How sure a retrained drop's standard error must make it within "
                                                   "the limit (0.5: its point estimate; 0.84: one standard error "
                                                   "inside).")] = 0.5,
    replicates: Annotated[int, typer.Option(help="Full runs of one plan at most: a plan at the bisection's edge "
                                                 "whose drop lies within one standard error of the limit is run "
                                                 "again at another seed and judged by the mean (1: never).")] = 2,
    storage: StorageOpt = None,
    artifacts: ArtifactsOpt = None,
    model: OwnModelOpt = None,
    device: DeviceOpt = "cpu",
    threads: ThreadsOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Retrain the study's front at the full budget, bisecting it, and export the fastest plan whose
    retrained drop is within the limit. Short trials overstate what a plan loses, so plans beyond the
    study's limit at trial fidelity are candidates too. Each full run is an `export`."""
    from . import report as reporting, search, storage as stores
    from .finalize import finalize, state

    opened = _study_of(study, storage, model)
    built, dev, n_threads = _rebuilt(opened, device, threads, artifacts, data_dir)
    config = built.config
    limit = config.max_acc_drop if max_acc_drop is None else max_acc_drop
    admm_epochs, retrain_epochs = search.full_epochs(config, epochs)
    done_at = search.epochs_text(admm_epochs, retrain_epochs)
    now = state(opened, limit, done_at, confidence, replicates)
    if now.doubt:
        cost = search.full_run_cost(built, admm_epochs, retrain_epochs)
        console.print(f"finalize within {limit:g} points of dense, retrained: {now.doubt} of the front's "
                      f"{len(now.front)} plans in doubt ({len(now.retrained)} retrained at these epochs before); "
                      f"one worker needs about {now.runs_left} full runs of {cost} on this device (timed on a "
                      f"few steps), ≤ {search.duration(cost.seconds * now.runs_left)}")
    stack = ExitStack()  # one progress bar per full run, closed before the run's verdict prints

    def on_run(trial: int, now: Any) -> Callable[..., None]:
        stack.close()
        console.print(_run_line(trial, now))
        return stack.enter_context(progress_bar(f"trial {trial}: ADMM {admm_epochs:g} + retrain {retrain_epochs:g} "
                                                "epochs"))

    def on_done(trial: int, result: Any) -> None:
        stack.close()
        console.print(_outcome(opened, trial, result, limit, confidence, done_at))

    with stack:
        done = finalize(built, opened, limit, admm_epochs, retrain_epochs, stores.study_dir(study) / "export",
                        retrains, confidence, replicates, on_run, on_done)
    reporting.write(opened, stores.study_dir(study))
    if done.best is not None:
        shipped = _run_of(opened, done.best, done_at)
        path = Path(shipped.get("path") or search.export_dir(stores.study_dir(study) / "export", done.best, done_at))
        host = shipped.get("host", "another machine")
        where = (f"its model is in {path}" if path.is_dir() else
                 f"its model was written to {path}{'' if host == platform.node() else ' on ' + host}, and is not "
                 f"there now: `sparsesearch export {study} --trial {done.best} --epochs {done_at}` writes it again")
        console.print(f"ship trial {done.best}: {_verdict(opened, done.best, limit, confidence, done_at)}; measured "
                      f"{shipped['speedup']:.2f}x ({dev}, batch {config.batch_size}, {n_threads} threads); {where}")
    else:
        console.print(f"no plan of the front is within {limit:g} points retrained"
                      + ("; a larger --max-acc-drop or longer --epochs may find one" if done.settled else " yet"))
    where = "settled"
    if done.next is not None:
        where = f"next: trial {done.next} (run the same command to go on)"
    elif done.busy:
        where = f"other workers retrain trials {_fold([str(n) for n in done.busy])} (run the same command after them)"
    runs = sum(len(r["drops"]) for r in done.retrained.values())
    console.print(f"{_count(runs, 'full run')} of {_count(len(done.retrained), 'plan')} of the {len(done.front)} on "
                  f"the front; {where}; "
                  f"see {stores.study_dir(study) / 'report.md'}")


def _run_of(opened: Any, trial: int, done_at: str) -> dict[str, Any]:
    from . import report as reporting

    return reporting.plan_runs(reporting.exported(opened), done_at)[trial]


def _verdict(opened: Any, trial: int, limit: float, confidence: float, done_at: str) -> str:
    """What trial's full run at `done_at` epochs says about the limit, and how sure."""
    from . import report as reporting

    r = _run_of(opened, trial, done_at)
    sure = reporting.sure_within(r, limit)
    return (f"retrained {reporting.retrained_text(r)} points below dense, {sure:.0%} sure within {limit:g} "
            f"({'enough' if sure >= confidence else 'not enough'} at --confidence {confidence:g})")


def _outcome(opened: Any, trial: int, result: Any, limit: float, confidence: float, done_at: str) -> str:
    """A full run's line: its verdict and measured speedup, or its divergence (recorded as lost)."""
    from .errors import Diverged

    if isinstance(result, Diverged):
        return f"trial {trial}: diverged at the full budget ({result}); counted beyond the limit"
    return (f"trial {trial}: {_verdict(opened, trial, limit, confidence, done_at)}; {_speedup(result.measured)}"
            f"{_resumed(result.resumed_at)}")


def _study_of(study: str, storage: str | None, model: str | None) -> Any:
    """A study `export` or `finalize` retrains plans of, with the model it records checked."""
    import optuna

    from . import search, storage as stores

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    opened = stores.open_study(study, storage, create=False)
    name = models.recorded(search.load_config(opened).model, model, f"study '{study}'")
    if model is not None and model != name:
        raise UserError(f"study '{study}' searched the model {name}, not {model}; drop --model, or name the study "
                        f"of {model}")
    return opened


def _rebuilt(opened: Any, device: str, threads: int | None, artifacts: str | None,
             data_dir: Path | None) -> tuple[Any, Any, int]:
    """The study's search rebuilt on this device to retrain with (its profile, where the file is still
    there): the search, the device, the threads."""
    from . import search, storage as stores
    from .runtime import resolve_device, set_threads

    search.recorded_dense(opened)
    dev = resolve_device(device)
    n_threads = set_threads(threads)
    stored = Path(opened.user_attrs.get("setting", {}).get("profile", ""))
    with progress_bar("loading the dense checkpoint and the latency model") as update:
        built = search.build(search.load_config(opened), dev, stores.artifacts_location(opened, artifacts), data_dir,
                             stored if stored.is_file() else None, allow_foreign=True,
                             notify=lambda text: console.print(f"[yellow]note:[/] {text}"),
                             on_progress=lambda phase, d, t, s: update(d, t, f"{phase} {s}"))
    return built, dev, n_threads


def _resumed(step: int) -> str:
    return f" (continued after step {step:,} of an interrupted run)" if step else ""


def _speedup(m: Any) -> str:
    """A measured speedup, with the statistic it is: under load the median of per-round ratios and
    the ratio of the two medians printed beside it differ, and a reader must be able to tell why."""
    medians = m.latency_ms["dense"] / m.latency_ms["compacted"]
    return f"{m.speedup:.2f}x speedup (median of per-round ratios; the medians' ratio is {medians:.2f}x)"


def _grouped(reasons: dict[str, str]) -> dict[str, list[str]]:
    """Layers by the reason they share, so a reason shared by 40 layers prints once."""
    grouped: dict[str, list[str]] = {}
    for name, why in reasons.items():
        grouped.setdefault(why, []).append(name)
    return grouped


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _fold(names: list[str], shown: int = 3) -> str:
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def _types(types: tuple[SparsityType, ...]) -> str:
    return "all" if len(types) == len(SparsityType) else ",".join(t.value for t in types)


def _plan_slug(plan: str) -> str:
    return Path(plan).stem if Path(plan).exists() else plan.replace("=", "-")
