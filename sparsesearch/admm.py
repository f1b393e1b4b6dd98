"""StructADMM: ADMM as a dynamic regulariser, then hard pruning and masked retraining.

W-step: SGD on loss + rho/2 * sum ||W - Z + U||_F^2 (the squared norm, as in the paper);
every `admm_interval` epochs: Z = Proj_S(W + U), U += W - Z, rho *= rho_factor (capped).
Each ADMM period restarts the learning rate and decays it (cosine) to its end.
Then W = Proj_S(W) and retraining with weights and gradients masked, so no pruned weight returns.
"""

from __future__ import annotations

import copy
import datetime
import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import Tensor, nn

from . import checkpoint
from .compact import slimmed
from .data import Data, Split
from .errors import UserError
from .graph import Coupling, Dependencies, dependencies
from .layers import Layer, trace
from .plan import LayerSparsity, Plan
from .runtime import versions
from .sparsity import REMOVED, SparsityType, achieved_rate, collapsed, identity_mask, mask
from .train import (Hooks, Progress, ProgressFn, Snapshot, TrainConfig, correct, evaluate, fit, percent, prepare,
                    refreshed_batchnorm)


@dataclass
class ADMMConfig:
    admm_epochs: float = 10  # W-step epochs in all; fractions are step budgets for short trials
    admm_interval: float = 0.25  # epochs per ADMM iteration (between Z/U updates)
    rho0: float = 1e-3
    rho_factor: float = 1.3
    rho_max: float = 10.0
    retrain_epochs: float = 5
    lr: float = 0.01
    retrain_lr: float = 0.01
    batch_size: int = 64
    weight_decay: float = 5e-4
    seed: int = 0
    precision: str = "float32"  # of the forward pass in training (`train.autocast`)
    layout: str = ""  # the memory layout it trains in (`train.TrainConfig.layout`)
    # What is evaluated, and on how much. `prune` reports everything: validation after every period,
    # test before, after hard pruning and at the end. A search trial scores on validation alone
    # (never test), and checks the projection each iteration on `probe` validation images only.
    probe: int = 0  # validation images (a fixed stratified subset) checked at rungs; 0: all, every period
    test: bool = True  # evaluate the test split
    # The search's fidelity ladder: fractions of the run's training steps at which the accuracy the
    # run would end with if hard-pruned now is checked on the probe (`Rung`), so a trial can stop there.
    rungs: tuple[float, ...] = ()

    def iterations(self) -> list[float]:
        """The epochs of each ADMM period; the last is shorter when the interval does not divide."""
        full, rest = divmod(self.admm_epochs, self.admm_interval)
        return [self.admm_interval] * int(full) + ([rest] if rest > 1e-9 else [])

    def admm_steps(self, train_images: int) -> int:
        """Training steps of the ADMM periods on `train_images` images."""
        return sum(_steps(train_images, self.batch_size, e) for e in self.iterations())

    def steps(self, train_images: int) -> int:
        """Training steps of the whole run, ADMM periods and retraining, on `train_images` images."""
        retrain = _steps(train_images, self.batch_size, self.retrain_epochs) if self.retrain_epochs > 0 else 0
        return self.admm_steps(train_images) + retrain

    def rung_steps(self, train_images: int) -> list[int]:
        """The training step of each rung on `train_images` images (see `rungs`)."""
        total = self.steps(train_images)
        return [max(1, math.ceil(f * total)) for f in self.rungs]

    def rho(self, iteration: int) -> float:
        """rho during ADMM period `iteration` (0-based): rho0 grown by rho_factor per update, capped."""
        return min(self.rho0 * self.rho_factor**iteration, self.rho_max)


@dataclass
class Iteration:
    """What each ADMM iteration reports."""

    index: int
    total: int
    rho: float
    residual: float  # primal residual ||W - Z|| / ||W|| over all pruned layers
    val_acc: float | None  # accuracy of W (still dense); None with a probe (not evaluated)
    # accuracy of Proj_S(W), what hard pruning now would give: every iteration on the validation
    # split, or with a probe on the probe at the iterations that reach a rung only (else None)
    projected_acc: float | None


@dataclass
class Rung:
    """A check on the fidelity ladder: the probe accuracy of the model hard-pruned as it stands
    after `step` of `total` training steps (in ADMM: at the end of the iteration reaching the rung,
    its projection; in retraining: the masked model itself)."""

    index: int
    step: int
    total: int
    phase: str  # "admm" or "retrain"
    acc: float


@dataclass
class Target:
    """Layers projected jointly (a coupled group) with one sparsity spec."""

    names: list[str]
    spec: LayerSparsity
    coupling: Coupling | None = None  # filter pruning of a whole channel space: where each filter sits

    @property
    def positions(self) -> list[Tensor] | None:
        return None if self.coupling is None else [torch.tensor(self.coupling.layers[n]) for n in self.names]


def targets(plan: Plan, deps: Dependencies | None = None) -> list[Target]:
    """One target per planned layer, except filter pruning: a channel space (`graph.Coupling`)
    whose layers are all filter-pruned alike is projected jointly on the summed norms of the filters
    at each position, so they keep the same channels and these can be physically removed."""
    grouped, out = set(), []
    for space in (deps or Dependencies()).spaces:
        specs = {plan.layers.get(n) for n in space.layers}
        if len(specs) == 1 and None not in specs and next(iter(specs)).type == SparsityType.FILTER:
            out.append(Target(list(space.layers), plan.layers[next(iter(space.layers))], space))
            grouped.update(space.layers)
    out += [Target([n], s) for n, s in plan.layers.items() if n not in grouped]
    return out


class ADMMState:
    """Z, U and rho for every target; penalty() is the extra W-step loss term."""

    def __init__(self, model: nn.Module, plan: Plan, deps: Dependencies | None = None) -> None:
        modules = dict(model.named_modules())
        self.model, self.plan, self.deps = model, plan, deps
        self.targets = targets(plan, deps)
        self.weights = [[modules[n].weight for n in t.names] for t in self.targets]
        with torch.no_grad():
            self.Z = self._project([[w.detach() for w in ws] for ws in self.weights])
        self.U = [[torch.zeros_like(w) for w in ws] for ws in self.weights]
        self.rho = 0.0

    def _project(self, values: list[list[Tensor]]) -> list[list[Tensor]]:
        """Proj_S of `values` (one list per target, as `weights`), by the hard prune's own masks."""
        named = {n: v for t, vs in zip(self.targets, values) for n, v in zip(t.names, vs)}
        masks = prune_masks(self.model, self.plan, self.deps, named)
        return [[named[n].masked_fill(~masks[f"{n}.weight"], 0) for n in t.names] for t in self.targets]

    @torch.no_grad()
    def set_rho(self, rho: float) -> None:
        """Change rho, rescaling U = lambda/rho so the dual lambda is unchanged (Boyd et al. 3.4.1);
        without this, U keeps integrating W - Z while rho is small and Z flips between supports."""
        if self.rho > 0:
            for us in self.U:
                for u in us:
                    u.mul_(self.rho / rho)
        self.rho = rho

    def penalty(self) -> Tensor:
        terms = [(w - z + u).pow(2).sum() for ws, zs, us in zip(self.weights, self.Z, self.U)
                 for w, z, u in zip(ws, zs, us)]
        return self.rho / 2 * torch.stack(terms).sum()

    @torch.no_grad()
    def update(self) -> float:
        """Z = Proj(W + U); U += W - Z. Returns the primal residual ||W - Z|| / ||W||."""
        diff, norm = 0.0, 0.0
        self.Z = self._project([[w + u for w, u in zip(ws, us)] for ws, us in zip(self.weights, self.U)])
        for ws, zs, us in zip(self.weights, self.Z, self.U):
            for w, z, u in zip(ws, zs, us):
                u.add_(w - z)
                diff += (w - z).pow(2).sum().item()
                norm += w.pow(2).sum().item()
        return math.sqrt(diff / max(norm, 1e-30))


CALIBRATION_IMAGES = 512  # training images BatchNorm statistics are re-estimated on before a projection is scored
_READERS = (SparsityType.CHANNEL, SparsityType.SHAPE, SparsityType.IRREGULAR, SparsityType.NM)


def prune_masks(model: nn.Module, plan: Plan, deps: Dependencies | None = None,
                weights: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    """Masks of Proj_S(W) by parameter name; of `weights` (by layer) where given: ADMM projects W + U.

    A pruned filter takes its bias and its BatchNorm entries with it, so the channel is exactly
    zero, as it will be once physically removed. A layer whose type selects among its inputs
    (channel, shape, irregular, nm) is then projected on the inputs that removed filters leave
    alive: weights that read a silenced channel are removed by compaction anyway, and in a short
    run a layer's whole budget can go to them (LeNet-5's classifier at shape 80% behind a 90%
    filter layer kept about 2 live inputs of 17, and 70.7% accuracy where the full run got 91.1%).
    """
    modules = dict(model.named_modules())

    def value(name: str) -> Tensor:
        return (weights or {}).get(name, modules[name].weight).detach()

    masks: dict[str, Tensor] = {}
    readers, filters, collapsing = [], False, []
    for t in targets(plan, deps):
        if _collapses(t, deps):
            keeps = [identity_mask(value(t.names[0]))]
            collapsing.append(t)
        else:
            keeps = mask([value(n) for n in t.names], t.spec.type, t.spec.rate, positions=t.positions)
        _set_masks(masks, modules, t, keeps)
        filters |= t.spec.type == SparsityType.FILTER
        readers += [n for n in t.names if t.spec.type in _READERS and getattr(modules[n], "groups", 1) == 1]
    if collapsing and deps.input_shape:
        _follow_silenced(model, masks, modules, collapsing, deps.input_shape)
    if filters and readers and deps is not None and deps.input_shape:
        for name, silenced in _silenced_inputs(model, masks, readers, deps.input_shape).items():
            w = value(name)
            if silenced.numel() == w.shape[1]:
                live = (~silenced).to(w.device).view(1, -1, *[1] * (w.dim() - 2))
                masks[f"{name}.weight"] = mask([w * live], plan.layers[name].type, plan.layers[name].rate)[0]
    return masks


def _collapses(t: Target, deps: Dependencies | None) -> bool:
    """Whether a target is a layer removed where it collapses to its identity path (`identity_mask`)."""
    return (deps is not None and t.spec.type == SparsityType.FILTER and t.spec.rate == REMOVED
            and len(t.names) == 1 and t.names[0] in deps.collapsible)


def _set_masks(masks: dict[str, Tensor], modules: dict[str, nn.Module], t: Target, keeps: list[Tensor]) -> None:
    """A target's weight masks, and for filter pruning the biases and BatchNorm entries its dead filters take."""
    for name, keep in zip(t.names, keeps):
        masks[f"{name}.weight"] = keep
        if t.spec.type == SparsityType.FILTER and modules[name].bias is not None:
            masks[f"{name}.bias"] = keep.reshape(keep.shape[0], -1).any(1)
    if t.coupling is not None:
        kept = torch.zeros(t.coupling.size, dtype=torch.bool)
        for keep, positions in zip(keeps, t.positions):
            kept[positions] |= keep.reshape(keep.shape[0], -1).any(1).cpu()
        for norm, (channels, positions) in t.coupling.norms.items():
            _mask_norm(masks, modules[norm], norm, channels, kept[positions])


def _follow_silenced(model: nn.Module, masks: dict[str, Tensor], modules: dict[str, nn.Module],
                     collapsed: list[Target], input_shape: tuple[int, ...]) -> None:
    """A collapsed layer passes each channel through, so where the masks silence one of its inputs
    (a filter pruned before it) its own filter there goes too, with its bias and BatchNorm entries:
    else BN(0) leaves a constant the compacted model cannot have, and its input and output channels
    no longer pair up. Until nothing changes: a collapsed layer after another sees the channels that
    one loses."""
    while True:
        reached = _reached_inputs(model, masks, [t.names[0] for t in collapsed], input_shape)
        changed = False
        for t in collapsed:
            keep = masks[f"{t.names[0]}.weight"]
            narrower = keep & reached[t.names[0]].to(keep.device).view(-1, *[1] * (keep.dim() - 1))
            if not torch.equal(narrower, keep):
                _set_masks(masks, modules, t, [narrower])
                changed = True
        if not changed:
            return


def _reached_inputs(model: nn.Module, masks: dict[str, Tensor], names: list[str],
                    input_shape: tuple[int, ...]) -> dict[str, Tensor]:
    """Per named layer, the input features the masks leave a path to: one forward of a copy whose
    weights are made positive (the masked ones zero) and whose BatchNorms pass a positive input on
    as positive (their masked entries give zero), on a positive input. Nothing cancels there and no
    activation is zero by chance (a trained channel may be on two random samples, most of all on a
    2x2 plane), so a feature is zero only where the masks cut every path to it (for networks of
    positive-preserving steps: a normalisation that subtracts a mean at run time can cut more)."""
    probe = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in probe.named_parameters():
            p.abs_().mul_(masks[name].to(p.device)) if name in masks else p.abs_()
        for name, m in probe.named_modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_var is not None:
                m.running_mean.zero_()
                m.running_var.fill_(1.0)
                if m.affine:
                    keep = masks.get(f"{name}.weight", torch.ones_like(m.weight, dtype=torch.bool)).to(m.weight)
                    m.weight.copy_(keep)
                    m.bias.copy_(keep)
    return _nonzero_inputs(probe, names, _probe(probe, input_shape).abs() + 0.1)


def _nonzero_inputs(model: nn.Module, names: list[str], x: Tensor) -> dict[str, Tensor]:
    """Per named module, which features of its input (a Linear's last dim, else dim 1: channels)
    are non-zero somewhere in one eval-mode forward on x."""
    modules = dict(model.named_modules())
    seen: dict[str, Tensor] = {}

    def record(name: str) -> Callable[..., None]:
        def hook(m: nn.Module, args: tuple[Tensor, ...]) -> None:
            t = args[0].detach()
            seen[name] = (t.reshape(-1, t.shape[-1]).ne(0).any(0) if isinstance(m, nn.Linear)
                          else t.transpose(0, 1).flatten(1).ne(0).any(1)).cpu()
        return hook

    handles = [modules[n].register_forward_pre_hook(record(n)) for n in names]
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return seen


def _probe(model: nn.Module, input_shape: tuple[int, ...]) -> Tensor:
    """Two seeded random samples on the model's device and dtype."""
    p = next(model.parameters())
    return torch.randn(2, *input_shape, generator=torch.Generator().manual_seed(0)).to(p.device, p.dtype)


def _silenced_inputs(model: nn.Module, masks: dict[str, Tensor], names: list[str],
                     input_shape: tuple[int, ...]) -> dict[str, Tensor]:
    """Per named layer, the input features the masks silence (non-zero before, zero after): the
    removed filters' channels as the layer reads them, through residual sums and flattens."""
    masked = copy.deepcopy(model)
    x = _probe(masked, input_shape)
    before = _nonzero_inputs(masked, names, x)
    apply_masks(masked, masks)
    after = _nonzero_inputs(masked, names, x)
    return {n: before[n] & ~after[n] for n in names if (before[n] & ~after[n]).any()}


def _mask_norm(masks: dict[str, Tensor], norm: nn.Module, name: str, channels: list[int], kept: Tensor) -> None:
    """Zero a BatchNorm's affine entries at the channels whose position was pruned; a BatchNorm
    after a concatenation collects the masks of several channel spaces."""
    if not norm.affine:
        return
    keep = masks.get(f"{name}.weight", torch.ones(norm.num_features, dtype=torch.bool)).clone()
    keep[torch.tensor(channels)[~kept]] = False
    masks[f"{name}.weight"] = masks[f"{name}.bias"] = keep


def apply_masks(model: nn.Module, masks: dict[str, Tensor]) -> None:
    """Hard prune: zero every masked-out weight in place."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, keep in masks.items():
            params[name].mul_(keep.to(params[name].device))


def dead_channels(model: nn.Module, masks: dict[str, Tensor], input_shape: tuple[int, ...]) -> dict[str, int]:
    """BatchNorm channels the masks silence although their input still varies after hard pruning,
    per BatchNorm: kept channels killed by a wrong follower mapping. Judged from one forward on
    random inputs, independently of the dependency graph that chose the masks."""
    norms = [n for n, m in model.named_modules()
             if isinstance(m, nn.modules.batchnorm._BatchNorm) and f"{n}.weight" in masks]
    live = _nonzero_inputs(model, norms, _probe(model, input_shape))
    dead = {n: int((live[n] & ~masks[f"{n}.weight"].cpu()).sum()) for n in live}
    return {n: k for n, k in dead.items() if k}


def masked_hooks(model: nn.Module, masks: dict[str, Tensor]) -> Hooks:
    """Retraining hooks: gradients are masked before each step (so momentum and weight decay,
    built from a fresh optimizer, stay zero there) and weights re-masked after it, as a guarantee."""
    params = dict(model.named_parameters())
    pairs = [(params[n], m.to(params[n].device)) for n, m in masks.items()]

    def mask_grads() -> None:
        for p, m in pairs:
            if p.grad is not None:
                p.grad.mul_(m)

    return Hooks(before_step=mask_grads, after_step=lambda _step: apply_masks(model, masks))


@dataclass
class PruneResult:
    masks: dict[str, Tensor]
    iterations: list[Iteration]
    accuracy: dict[str, float]  # final_val; with config.test, test accuracy: dense, hard_pruned, final
    val_correct: Tensor  # per validation image, whether the final model is right (a paired comparison)
    layers: list[dict[str, object]] = field(default_factory=list)
    seconds: float = 0.0  # of training and evaluation, summed over an interrupted run's parts
    resumed_at: int = 0  # training steps an interrupted run had done when this call continued it

    @property
    def macs(self) -> tuple[int, int]:
        """Dense and pruned MACs per sample of the prunable layers, each layer counting only its own
        kept rows/columns (`compact` also counts the inputs that removed filters free downstream)."""
        return sum(r["macs"] for r in self.layers), sum(r["macs_compacted"] for r in self.layers)


def _steps(train_images: int, batch_size: int, epochs: float) -> int:
    return max(1, math.ceil(epochs * math.ceil(train_images / batch_size)))


def run_key(model: nn.Module, data: Data, plan: Plan, config: ADMMConfig) -> dict[str, object]:
    """What makes two runs the same run: the starting weights (their digest), data split, plan and
    config (without a float32 `precision`: the keys of runs from before it existed stay theirs).
    A resume file holding another run's key is ignored, never continued."""
    digest = hashlib.sha256()
    for name, value in model.state_dict().items():
        digest.update(name.encode())
        digest.update(value.detach().cpu().reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
    settings = {k: v for k, v in asdict(config).items() if (k, v) != ("precision", "float32")}
    return json.loads(json.dumps({"weights": digest.hexdigest(), "data": data.describe(), "plan": plan.to_dict(),
                                  "config": settings}))


RESUME = "admm.resume.pt"  # an interrupted `prune` or `export` keeps its state under this name in its output folder


def resume_files(resume: Path) -> list[Path]:
    """The files a run resumable at `resume` keeps (its own and its retraining's); the caller deletes
    them once it has saved what the run returned."""
    return [resume, resume.with_name(f"retrain-{resume.name}")]


def run_admm(model: nn.Module, data: Data, plan: Plan, config: ADMMConfig, device: torch.device,
             deps: Dependencies | None = None, on_iteration: Callable[[Iteration], None] | None = None,
             on_progress: ProgressFn | None = None, on_rung: Callable[[Rung], None] | None = None,
             resume: Path | None = None) -> PruneResult:
    """ADMM training, hard prune and masked retraining of `model` in place; `deps` defaults to the
    model's own dependency graph. `on_rung` hears each rung of `config.rungs` (it may raise to stop).
    With `resume`, a run of hours survives Ctrl-C: its state is kept there after every ADMM period,
    at hard pruning, after every retraining epoch and at the end, and a later call for the same run
    (`run_key`) continues from it with the result an uninterrupted run gives."""
    start = time.perf_counter()
    deps = deps or dependencies(model, data.input_shape)
    snapshot = Snapshot(resume, run_key(model, data, plan, config)) if resume is not None else None
    saved = (snapshot.load() if snapshot is not None else None) or {}
    model.to(device)
    periods = config.iterations()
    total = config.steps(len(data.train))
    if saved:
        model.load_state_dict(saved["model"])
    done = saved.get("done", 0)
    resumed_at = done

    def keep(phase: str, **extra: object) -> None:
        if snapshot is not None:
            snapshot.save({"phase": phase, "model": model.state_dict(), "done": done, "accuracy": accuracy,
                           "iterations": [asdict(i) for i in iterations], "rungs": [asdict(r) for r in reached],
                           "seconds": time.perf_counter() - start + saved.get("seconds", 0.0), **extra})

    def relay(phase: str) -> ProgressFn:
        def forward(p: Progress) -> None:
            if on_progress is not None:
                on_progress(Progress(done + p.step, total, p.epoch, p.loss, p.val_acc, phase))
        return forward

    def train_config(epochs: float, lr: float, seed: int) -> TrainConfig:
        return TrainConfig(epochs, config.batch_size, lr, 0.9, config.weight_decay, seed, config.precision,
                           config.layout)

    accuracy = saved.get("accuracy") or ({"dense": evaluate(model, data.test, device)} if config.test else {})
    probe = data.val.sized(config.probe) if config.probe else data.val
    calibration = data.train.sized(CALIBRATION_IMAGES)
    rung_steps = config.rung_steps(len(data.train))
    reached = [Rung(**r) for r in saved.get("rungs", [])]
    iterations = [Iteration(**i) for i in saved.get("iterations", [])]

    def reaches(at: int) -> bool:
        return len(reached) < len(rung_steps) and at >= rung_steps[len(reached)]

    def climb(at: int, phase: str, acc: Callable[[], float]) -> None:
        """Report every rung `at` steps reach (`acc` evaluated once, and only if one is reached)."""
        value = None
        while reaches(at):
            value = acc() if value is None else value
            reached.append(Rung(len(reached), at, total, phase, value))
            if on_rung is not None:
                on_rung(reached[-1])
    if saved.get("phase") in (None, "admm"):
        state = ADMMState(model, plan, deps)
        if saved:
            state.Z = [[z.to(device) for z in zs] for zs in saved["Z"]]
            state.U = [[u.to(device) for u in us] for us in saved["U"]]
            state.rho = saved["rho"]
        for i in range(len(iterations), len(periods)):
            state.set_rho(config.rho(i))
            history = fit(model, data, train_config(periods[i], config.lr, config.seed + i), device,
                          Hooks(penalty=state.penalty if plan.layers else None), relay(f"admm {i + 1}/{len(periods)}"),
                          validate=not config.probe)
            done += _steps(len(data.train), config.batch_size, periods[i])
            residual = state.update()
            projected = (projected_accuracy(model, probe, plan, deps, device, calibration)
                         if not config.probe or reaches(done) else None)
            iterations.append(Iteration(i + 1, len(periods), state.rho, residual, history.val_acc, projected))
            keep("admm", Z=state.Z, U=state.U, rho=state.rho)
            if on_iteration is not None:
                on_iteration(iterations[-1])
            climb(done, "admm", lambda: projected)
        masks = prune_masks(model, plan, deps)
        apply_masks(model, masks)
        open_identity_paths(model, plan, deps, masks)
        if dead := dead_channels(model, masks, data.input_shape):
            raise UserError(f"hard pruning silenced {sum(dead.values())} kept channels "
                            f"({', '.join(f'{n}: {k}' for n, k in dead.items())}); the channel mapping of this "
                            "model is wrong, please report the model")
        if config.test:
            accuracy["hard_pruned"] = evaluate(model, data.test, device)
        keep("retrain", masks=masks)
    else:
        masks = {n: m.to(device) for n, m in saved["masks"].items()}
    if saved.get("phase") != "done":
        if config.retrain_epochs > 0:
            slim = slimmed(model, plan, data.input_shape)  # the same training at the pruned network's cost
            trainee = slim.model if slim else model
            hooks = masked_hooks(trainee, slim.masks(masks) if slim else masks)

            def after_step(step: int) -> None:
                hooks.after_step(step)  # re-mask first: the rung checks what the trial would end with
                climb(done + step, "retrain", lambda: evaluate(trainee, probe, device))

            # a masked run's snapshot does not fit the slim model, nor one of a slim model of other entries
            # (one made before removed branches trained as `Zeros`): such a snapshot is not this run's
            form = {"form": "slim", "entries": len(slim.index)} if slim else {}
            retrain = (Snapshot(resume_files(resume)[1], {**snapshot.key, "phase": "retrain", **form})
                       if snapshot else None)
            try:
                fit(trainee, data, train_config(config.retrain_epochs, config.retrain_lr, config.seed + len(periods)),
                    device, replace(hooks, after_step=after_step), relay("retrain"), retrain,
                    validate=not config.probe)
            finally:
                if slim:
                    slim.write_back(model)
        done = total
        if config.test:
            accuracy["final"] = evaluate(model, data.test, device)
        keep("done", masks=masks)
        if snapshot is not None:
            resume_files(snapshot.path)[1].unlink(missing_ok=True)
    val_correct = correct(model, data.val, device)
    accuracy["final_val"] = percent(val_correct)
    seconds = time.perf_counter() - start + saved.get("seconds", 0.0)
    return PruneResult(masks, iterations, accuracy, val_correct, seconds=seconds, resumed_at=resumed_at)


def projected_accuracy(model: nn.Module, split: Split, plan: Plan, deps: Dependencies | None,
                        device: torch.device, calibration: Split | None = None) -> float:
    """Accuracy of Proj_S(W) on `split`, computed on a swap of the weights and restored after; with
    `calibration` (training images), BatchNorm statistics re-estimated on them first, as retraining
    would (`refreshed_batchnorm`)."""
    params = dict(model.named_parameters())
    masks = prune_masks(model, plan, deps)
    norms = {n: m for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    saved = {n: params[n].detach().clone() for n in masks} | {
        f"{n}.{b}": m.get_buffer(b).clone() for n, m in norms.items()
        for b in ("running_mean", "running_var", "num_batches_tracked")
        if f"{n}.weight" in masks and m.running_var is not None}  # `open_identity_paths` resets some
    apply_masks(model, masks)
    open_identity_paths(model, plan, deps, masks)
    try:
        with refreshed_batchnorm(model, calibration, device):
            return evaluate(model, split, device)
    finally:
        with torch.no_grad():
            for n, w in saved.items():
                (params[n] if n in params else model.get_buffer(n)).copy_(w)


def open_identity_paths(model: nn.Module, plan: Plan, deps: Dependencies | None, masks: dict[str, Tensor]) -> None:
    """Start each collapsed layer (`identity_mask`) as its identity path: its kept weights 1, its
    bias 0, the BatchNorm after it with scale 1, shift 0 and fresh statistics (the identity in
    evaluation, a normalisation in training). As projected, it kept its trained diagonal, tiny and
    of mixed signs (vgg16-bn at 0.9: -0.03 to 0.04), under BatchNorm shifts learnt for the dense
    layer's outputs: with three of them in a row no channel was left alive at 2x2 and retraining
    never started (83 points lost)."""
    modules = dict(model.named_modules())
    with torch.no_grad():
        for t in targets(plan, deps):
            if not _collapses(t, deps):
                continue
            layer = modules[t.names[0]]
            layer.weight.copy_(masks[f"{t.names[0]}.weight"])
            if layer.bias is not None:
                layer.bias.zero_()
            for name in t.coupling.norms:
                norm = modules[name]
                if norm.running_var is not None:
                    norm.reset_running_stats()
                if norm.affine:
                    norm.weight.copy_(masks.get(f"{name}.weight", torch.ones_like(norm.weight, dtype=torch.bool)))
                    norm.bias.zero_()


def layer_report(model: nn.Module, layers: list[Layer], plan: Plan) -> list[dict[str, object]]:
    """Per planned layer: type, planned and achieved rate, dense and compacted MACs per sample. A
    sparse pattern no kernel takes on the model's device and dtype counts dense, with the reason; a
    collapsed layer is removed, one multiply-add per output element left."""
    from .kernels import compact_layer

    modules = dict(model.named_modules())
    rows = []
    for layer in layers:
        spec = plan.layers.get(layer.name)
        weight = modules[layer.name].weight.detach()
        fallback = (getattr(compact_layer(modules[layer.name], spec.type), "why", "")
                    if spec and spec.type in (SparsityType.IRREGULAR, SparsityType.NM) else "")
        gone = spec is not None and spec.rate == REMOVED and collapsed(weight)
        rows.append({
            "layer": layer.name,
            "type": spec.type.value if spec else "dense",
            "rate": spec.rate if spec else 0.0,
            "achieved": REMOVED if gone else achieved_rate(weight, spec.type) if spec else 0.0,
            "macs": layer.macs,
            "macs_compacted": (layer.positions * int(weight.ne(0).sum()) if gone
                               else layer.macs_with(weight, spec.type) if spec and not fallback else layer.macs),
            **({"runs_dense": fallback} if fallback else {}),
        })
    return rows


def prune_checkpoint(model_name: str | None, dataset_name: str | None, weights: Path, plan_text: str,
                     config: ADMMConfig, device: torch.device, out_dir: Path, data_dir: Path | None = None,
                     on_iteration: Callable[[Iteration], None] | None = None,
                     on_progress: ProgressFn | None = None, image_size: int | None = None) -> tuple[PruneResult, Path]:
    """`sparsesearch prune`: load, validate the plan, ADMM + prune + retrain, write weights, plan, metrics.
    A model, dataset or input side not given is the one the checkpoint's sidecar records. An
    interrupted call leaves its state in `out_dir` (`RESUME`); the same call continues from it."""
    model_name, dataset_name = checkpoint.trained_with(weights, model_name, dataset_name)
    model, data = prepare(model_name, dataset_name, data_dir, image_size=image_size, weights=weights, seed=config.seed)
    layers = trace(model, data.input_shape)
    deps = dependencies(model, data.input_shape)
    plan = Plan.parse(plan_text, layers, deps.couplings)
    resume = out_dir / RESUME
    result = run_admm(model, data, plan, config, device, deps, on_iteration, on_progress, resume=resume)
    model.cpu()
    result.layers = layer_report(model, layers, plan)
    plan.save(out_dir / "plan.json")
    dense_macs, pruned_macs = result.macs
    checkpoint.save(out_dir / "pruned.pt", model, {
        "kind": "pruned",
        "model": model_name,
        **data.describe(),
        "num_classes": data.info.num_classes,
        "dense_checkpoint": str(weights),
        "plan": "plan.json",
        "accuracy": {**result.accuracy, "unit": "% top-1 (test; final_val on validation)"},
        "macs": {"dense": dense_macs, "compacted": pruned_macs, "reduction": dense_macs / max(pruned_macs, 1),
                 "unit": "MACs per sample, prunable layers, counting each layer's own kept rows/columns"},
        "layers": result.layers,
        "admm_iterations": [asdict(i) for i in result.iterations],
        "admm_config": asdict(config),
        "seconds": round(result.seconds, 2),
        "resumed_at_step": result.resumed_at,
        "device": str(device),
        "versions": versions(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    })
    for path in resume_files(resume):
        path.unlink(missing_ok=True)
    return result, out_dir / "pruned.pt"
