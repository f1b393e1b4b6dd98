"""The Pareto set of a study, its measured speedups, and the report: plots and a markdown table.

`measure_front` compacts every promising Pareto-optimal trial (`front`) and every uniform baseline
and times it beside its masked dense form (`profiler.timing.compare`, one call per plan, so each speedup is
a ratio measured under the same load). Optuna forbids changing a finished trial, so the
measurements go to the study's `measured` user attr, keyed by trial number, with the device that
measured them in `measured_setting`; `rows` merges them with the trials' own attrs. One worker
measures a study at a time (a lease in the study), and all of a study's speedups come from one
device: measuring on another one measures every plan again. `pareto.json`, the PNGs and `report.md` are derived from the study
alone and rewritten atomically.
"""

from __future__ import annotations

import datetime
import statistics
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from .errors import Busy
from .files import save_with, write_json
from .runtime import DEFAULT_LAYOUT
from .space import ETA, RUNGS, promising
from .storage import release_lease, renew_lease, take_lease, worker
from .train import confidence_within

if TYPE_CHECKING:
    from .search import Trials

SCHEMA = 1
MEASURING = "measuring"  # the lease a worker holds while it measures the front
EXPORTED = "exported:"  # + "N@EPOCHS": a study attr per trial and epochs exported, so concurrent exports lose none


def export_key(study: optuna.Study, number: int, epochs: str, replicate: int = 0) -> str:
    """The study attr of trial `number`'s export at `epochs` ("4+2"): one per epochs, so a run at
    other epochs never replaces it (a record from before the epochs were part of the key keeps its
    own), and one per `replicate`, the runs of one plan at other seeds (`finalize`'s close calls)."""
    legacy = f"{EXPORTED}{number}"
    if replicate:
        return f"{legacy}@{epochs}#{replicate}"
    return legacy if study.user_attrs.get(legacy, {}).get("epochs") == epochs else f"{legacy}@{epochs}"
FINALIZED = "finalized"  # study attr: where `finalize`'s last call left its bisection of the front
TYPE_COLORS = {"filter": "#1f77b4", "channel": "#ff7f0e", "shape": "#2ca02c", "irregular": "#9467bd", "nm": "#8c564b"}


# --- the front and its measurement ----------------------------------------------------------------


def front(study: optuna.Study) -> list[FrozenTrial]:
    """Pareto-optimal trials (accuracy, predicted speedup) among the promising ones, by predicted
    speedup: within the study's trial limit (`search.trial_limit`), which full runs raise above the
    user's when plans that lost more in their trials came within it retrained. Judged at the user's
    limit alone, a calibrated study's front showed none of them: on resnet56 (trial limit 2.10, user's
    0.5) it left out trial 33, 1.72x predicted at 0.98, faster than all three plans it showed."""
    from .search import load_config, trial_limit

    limit = trial_limit(study, load_config(study).max_acc_drop) if "config" in study.user_attrs else None
    return nondominated(t for t in study.get_trials(False, states=(TrialState.COMPLETE,)) if promising(t, limit))


def nondominated(trials: Iterable[FrozenTrial]) -> list[FrozenTrial]:
    """The trials no other beats in both validation accuracy and predicted speedup (of two alike, the
    first), slowest first."""
    kept: list[FrozenTrial] = []
    for t in sorted(trials, key=lambda t: (-t.values[1], -t.values[0], t.number)):  # fastest first
        if not kept or t.values[0] > kept[-1].values[0]:
            kept.append(t)
    return kept[::-1]


def baselines(study: optuna.Study) -> list[FrozenTrial]:
    return [t for t in study.get_trials(False, states=(TrialState.COMPLETE,)) if "baseline" in t.user_attrs]


def measure_front(search: Trials, study: optuna.Study, on_progress: Callable[[int, int, str], None] | None = None,
                  again: bool = False) -> dict[str, dict[str, Any]]:
    """Compact and time (beside the masked dense model, on the search's device and batch size) every
    promising Pareto trial (`front`) and every baseline not measured yet on this device (all of them if
    `again`); store and return all measurements. Raises `Busy` while another worker measures."""
    from .compact import measure
    from .plan import Plan

    holder = take_lease(study, MEASURING)
    if holder is not None:
        raise Busy(f"worker {holder} is measuring the front of study '{study.study_name}'; its speedups "
                   "appear in the report when it is done")
    try:
        setting = _setting(search)
        earlier = {"layout": DEFAULT_LAYOUT, **(study.user_attrs.get("measured_setting") or {})}  # before layouts
        same = not again and all(earlier.get(k) == v for k, v in setting.items() if k in _SAME_DEVICE)
        measured: dict[str, dict[str, Any]] = dict(study.user_attrs.get("measured", {})) if same else {}
        todo = [t for t in {t.number: t for t in [*front(study), *baselines(study)]}.values()
                if str(t.number) not in measured and "weights" in t.user_attrs]
        if todo or not same:
            study.set_user_attr("measured", measured)
            study.set_user_attr("measured_setting", setting)
        for i, trial in enumerate(todo):
            if on_progress:
                on_progress(i, len(todo), f"trial {trial.number}")
            plan = Plan.from_dict({"layers": trial.user_attrs["plan"]}, f"trial {trial.number}")
            m = measure(search.trained(trial), plan, search.input_shape, search.config.model, search.device,
                        search.config.batch_size, search.config.channels_last)
            measured[str(trial.number)] = {
                "measured_speedup": m.speedup, "latency_ms": m.latency_ms, "spread": m.spread, "macs": m.macs,
                "params": m.params, "impl": dict(Counter(m.compacted.impl.values())),
                "left_dense": m.compacted.left_dense, "by": worker()}
            study.set_user_attr("measured", measured)  # after each plan: an interruption keeps the rest
            renew_lease(study, MEASURING)
        if on_progress:
            on_progress(len(todo), len(todo), "")
        return measured
    finally:
        release_lease(study, MEASURING)


_SAME_DEVICE = ("device", "device_name", "batch_size", "threads", "torch", "layout")  # speedups compare in these


def _setting(search: Trials) -> dict[str, Any]:
    """The device and setting measuring now, as `measured_setting` records it."""
    from .profiler.table import fingerprint

    here = fingerprint(search.device, search.config.batch_size, "float32")
    return {"device": str(search.device), "device_name": here["device_name"], "batch_size": search.config.batch_size,
            "threads": here["threads"], "torch": here["torch"], "layout": search.config.layout, "by": worker(),
            "how": "median of interleaved rounds beside the masked dense model, inference_mode, eval",
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


# --- rows -----------------------------------------------------------------------------------------


def row(trial: FrozenTrial, measured: dict[str, dict[str, Any]]) -> dict[str, Any]:
    a = trial.user_attrs
    out = {"trial": trial.number, "baseline": a.get("baseline"), "feasible": a.get("feasible"),
           "val_acc": a.get("val_acc"), "acc_drop": a.get("acc_drop"), "acc_drop_se": a.get("acc_drop_se"),
           "feasible_confidence": a.get("feasible_confidence"),
           "predicted_speedup": a.get("predicted_speedup"), "predicted_ms": a.get("predicted_ms"),
           "plan": a.get("plan")}
    return {**out, **measured.get(str(trial.number), {})}


def pareto(study: optuna.Study) -> dict[str, Any]:
    """What pareto.json holds: the study's settings and dense baseline, and one row per Pareto trial."""
    measured = study.user_attrs.get("measured", {})
    return {"schema": SCHEMA, "study": study.study_name, "config": study.user_attrs.get("config"),
            "dense": study.user_attrs.get("dense"), "measured_setting": study.user_attrs.get("measured_setting"),
            "sensitivity": study.user_attrs.get("sensitivity"), "control": control(study),
            "units": {"val_acc": "% top-1, validation split (the objective)",
                      "acc_drop": "points of validation accuracy below the control (or, without one, the dense "
                                  "model), on the same images",
                      "acc_drop_se": "standard error of acc_drop, from the per-image differences (paired)",
                      "feasible_confidence": "P(true drop <= max_acc_drop) under a normal error of acc_drop_se",
                      "latency_ms": "ms per call of the whole batch, median", "macs": "per sample, prunable layers",
                      "speedup": "dense latency / compacted latency"},
            "pareto": [row(t, measured) for t in front(study)],
            "baselines": [row(t, measured) for t in baselines(study)], "exported": exported(study),
            "finalized": study.user_attrs.get(FINALIZED)}


def exported(study: optuna.Study) -> list[dict[str, Any]]:
    """The trials `export` retrained at the full budget: each one's drop at trial fidelity beside the
    exported model's drops and measured speedup. How the two drops compare says how strict a limit
    at trial fidelity is on the model a user ships (on resnet56, retrained drops were a median 0.28x)."""
    trials = {str(t.number): t for t in study.get_trials(False)}
    rows = [{"trial": t.number, **value, "acc_drop": t.user_attrs.get("acc_drop"),
             "acc_drop_se": t.user_attrs.get("acc_drop_se")}
            for key, value in study.user_attrs.items()
            if key.startswith(EXPORTED) and (t := trials.get(key.removeprefix(EXPORTED).partition("@")[0]))]
    return sorted(rows, key=lambda r: (r["trial"], r["epochs"], r.get("replicate", 0)))


def plan_runs(rows: Iterable[dict[str, Any]], epochs: str) -> dict[int, dict[str, Any]]:
    """Per trial, its full runs at `epochs` (`exported` rows) as one: the mean validation drop, whose
    standard error is the runs' own over the square root of their number (each run's paired error
    stands for how far a retrained drop strays: one plan, retrained on two machines, came 0.03 and
    0.57 at ± 0.24), `drops` each run's, and the rest (model, test drop, speedup) of the run to
    ship: the one that lost least on the validation split. A plan with a diverged run is as lost."""
    runs: dict[int, list[dict[str, Any]]] = {}
    for r in rows:
        if r["epochs"] == epochs:
            runs.setdefault(r["trial"], []).append(r)
    return {n: mean_run(found) for n, found in runs.items()}


def mean_run(runs: list[dict[str, Any]], drop: str = "val_drop", se: str = "val_drop_se") -> dict[str, Any]:
    """Runs of one plan as one (`plan_runs`), their drops and errors under the keys `drop` and `se`."""
    drops = [r[drop] for r in runs]
    ses = [r.get(se) for r in runs]
    lost = next((r for r in runs if r.get("diverged")), None)
    return {**(lost or min(runs, key=lambda r: r[drop])), drop: statistics.fmean(drops),
            se: sum(s * s for s in ses) ** 0.5 / len(ses) if None not in ses else None, "drops": drops}


def control(study: optuna.Study) -> dict[str, float] | None:
    """The study's control (`search.control`) without its per-image vector, or None for a study without one."""
    found = study.user_attrs.get("control")
    return {k: v for k, v in found.items() if k != "correct"} if found else None


def reference_val(study: optuna.Study) -> float:
    """The validation accuracy the trials' drops are taken from: the control's, else the dense model's."""
    return (control(study) or study.user_attrs.get("dense", {})).get("val", 100.0)


def best_within(rows: list[dict[str, Any]], drop: float) -> dict[str, Any] | None:
    """The row with the highest measured speedup among those whose drop is within `drop` points."""
    ok = [r for r in rows if r.get("measured_speedup") and r.get("acc_drop") is not None and r["acc_drop"] <= drop]
    return max(ok, key=lambda r: r["measured_speedup"], default=None)


# --- plots ----------------------------------------------------------------------------------------


def _title(study: optuna.Study, what: str) -> str:
    c = study.user_attrs.get("config", {})
    s = {**study.user_attrs.get("setting", {}), **(study.user_attrs.get("measured_setting") or {})}
    return (f"{what}: {c.get('model')} on {c.get('dataset')}\n{s.get('device_name', s.get('device', '?'))}, "
            f"batch {s.get('batch_size', c.get('batch_size'))}, {s.get('threads', '?')} threads")


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    save_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight"))
    plt.close(fig)
    return path


def plot_pareto(study: optuna.Study, path: Path) -> Path:
    import matplotlib.pyplot as plt

    measured = study.user_attrs.get("measured", {})
    dense, config = study.user_attrs.get("dense", {}), study.user_attrs.get("config", {})
    floor = reference_val(study) - config.get("max_acc_drop", 1.0)
    reference = "control" if control(study) else "dense"
    done = [t for t in study.get_trials(False, states=(TrialState.COMPLETE,))]
    retrained = [dense.get("val", 100) - r["val_drop"] for r in exported(study) if not r.get("diverged")]
    bottom = min([floor - max(3 * config.get("max_acc_drop", 1.0), 2.0)]
                 + [t.user_attrs["val_acc"] for t in done if t.user_attrs.get("feasible")] + retrained)
    fig, ax = plt.subplots(figsize=(8, 5.5))
    ax.axhline(floor, color="crimson", ls="--", lw=1, label=f"constraint: {reference} - {config.get('max_acc_drop')} pts")
    groups = {"feasible trials (predicted speedup)": [t for t in done if t.user_attrs.get("feasible")],
              "infeasible trials (predicted speedup)": [t for t in done if not t.user_attrs.get("feasible")]}
    for (label, trials), style in zip(groups.items(), [{"marker": "o", "mfc": "none", "color": "tab:blue"},
                                                       {"marker": "x", "color": "grey"}]):
        inside = [t for t in trials if t.user_attrs["val_acc"] >= bottom]
        ax.plot([t.user_attrs["predicted_speedup"] for t in inside], [t.user_attrs["val_acc"] for t in inside],
                ls="none", ms=6, alpha=0.7, label=label, **style)
    low = [t for t in done if t.user_attrs["val_acc"] < bottom]
    if low:
        ax.plot([t.user_attrs["predicted_speedup"] for t in low], [bottom - 0.3] * len(low), "v", color="grey",
                alpha=0.7, label="trials below the axis (predicted speedup)")
    below = sum(t.user_attrs["val_acc"] < bottom for t in done)
    pf = [t for t in front(study) if str(t.number) in measured]
    if pf:
        xs = [measured[str(t.number)]["measured_speedup"] for t in pf]
        ys = [t.user_attrs["val_acc"] for t in pf]
        order = sorted(range(len(xs)), key=xs.__getitem__)
        ax.plot([xs[i] for i in order], [ys[i] for i in order], "o-", color="tab:red", ms=8,
                label="Pareto front (measured speedup)")
        for t, x, y in zip(pf, xs, ys):
            ax.annotate(f"#{t.number}", (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    for t in baselines(study):
        if str(t.number) in measured:  # labelled at its measured square; below the axis, a marker at the edge
            x, acc = measured[str(t.number)]["measured_speedup"], t.user_attrs["val_acc"]
            clipped = acc < bottom
            y = bottom - 0.3 if clipped else acc
            ax.plot(x, y, "v" if clipped else "s", color="tab:green", ms=8, label="uniform baselines (measured)"
                    if "uniform baselines (measured)" not in ax.get_legend_handles_labels()[1] else None)
            ax.annotate(t.user_attrs["baseline"] + (f" ({acc:.1f}%, below the axis)" if clipped else ""), (x, y),
                        textcoords="offset points", xytext=(-6, -14), fontsize=8, color="tab:green", ha="right")
    _plot_retrained(ax, study, dense.get("val", 100), {t.number: t for t in done})
    ax.plot(1.0, dense.get("val", 100), "*", color="black", ms=14, label="dense model")
    if reference == "control":
        ax.plot(1.0, reference_val(study), "P", color="black", ms=9, label="control: the trial recipe, nothing pruned")
    ax.set_ylim(bottom - 0.6, max(dense.get("val", 100), *[t.user_attrs["val_acc"] for t in done], *retrained) + 0.5)
    ax.set_xlabel("end-to-end speedup over the dense model (x; measured = median latency ratio)")
    ax.set_ylabel("validation accuracy (% top-1)")
    note = f"; {below} below the axis, drawn at its edge" if below else ""
    pruned = len(study.get_trials(False, states=(TrialState.PRUNED,)))
    ax.set_title(_title(study, "accuracy vs speedup") + f"\n{len(done)} trials trained, {pruned} rejected or pruned{note}",
                 fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    return _save(fig, path)


def _plot_retrained(ax: Any, study: optuna.Study, dense_val: float, trials: dict[int, FrozenTrial]) -> None:
    """Exported plans at their retrained accuracy and measured speedup, each tied by a dotted line to
    its trial: how far short training understated it. `finalize`'s pick is ringed, its limit drawn,
    and only its epochs' runs shown (runs at other epochs are not comparable with them)."""
    done = study.user_attrs.get(FINALIZED)
    rows = [r for r in exported(study) if not r.get("diverged") and (not done or r["epochs"] == done["epochs"])]
    several = len({r["epochs"] for r in rows}) > 1
    for r in rows:
        t = trials[r["trial"]]
        x, y = r["speedup"], dense_val - r["val_drop"]
        ax.plot([t.user_attrs["predicted_speedup"], x], [t.user_attrs["val_acc"], y], ":", color="tab:purple", lw=1)
        ax.annotate(f"#{t.number}" + (f" ({r['epochs']})" if several else ""), (x, y), textcoords="offset points",
                    xytext=(5, -10), fontsize=8, color="tab:purple")
    if rows:
        at = f" ({done['epochs']} epochs)" if done else ""
        ax.plot([r["speedup"] for r in rows], [dense_val - r["val_drop"] for r in rows], "D", color="tab:purple",
                ms=6, ls="none", label=f"retrained at the full budget{at} (measured; dotted: its trial)")
    if done:
        ax.axhline(dense_val - done["limit"], color="tab:purple", ls="--", lw=1,
                   label=f"finalize: dense - {done['limit']:g} pts, retrained")
        if (best := plan_runs(rows, done["epochs"]).get(done["best"])) is not None:  # at its runs' mean
            ax.plot(best["speedup"], dense_val - best["val_drop"], "o", mfc="none", mec="tab:purple", ms=16,
                    label=f"shipped by finalize (#{best['trial']})")


def plot_predicted_vs_measured(study: optuna.Study, path: Path) -> Path:
    import matplotlib.pyplot as plt

    measured = study.user_attrs.get("measured", {})
    trials = {t.number: t for t in study.get_trials(False, states=(TrialState.COMPLETE,))}
    points = [(trials[int(n)], m) for n, m in measured.items() if int(n) in trials]
    fig, ax = plt.subplots(figsize=(6, 5.5))
    xs = [t.user_attrs["predicted_speedup"] for t, _ in points]
    ys = [m["measured_speedup"] for _, m in points]
    hi = max([1.0, *xs, *ys]) * 1.1
    ax.plot([0, hi], [0, hi], color="grey", lw=1, ls="--", label="measured = predicted")
    colors = ["tab:green" if "baseline" in t.user_attrs else "tab:red" for t, _ in points]
    ax.scatter(xs, ys, c=colors, s=40, zorder=3)
    for (t, _), x, y in zip(points, xs, ys):
        ax.annotate(f"#{t.number}", (x, y), textcoords="offset points", xytext=(5, 3), fontsize=8)
    ax.scatter([], [], c="tab:red", label="Pareto trials")
    ax.scatter([], [], c="tab:green", label="uniform baselines")
    ax.set_xlim(min([0.8, *xs]) * 0.95, hi)
    ax.set_ylim(min([0.8, *ys]) * 0.95, hi)
    ax.set_xlabel("predicted speedup (x; latency model on the profile)")
    ax.set_ylabel("measured speedup (x; median latency ratio)")
    ax.set_title(_title(study, "predicted vs measured speedup"), fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    return _save(fig, path)


def plot_layers(study: optuna.Study, path: Path) -> Path:
    """A grid of the Pareto trials' and baselines' per-layer plans (colour: type; shade and text:
    rate). Up to 12 layers run across; more run down, one row each, so 20-60 layers stay readable."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    trials = front(study) + [t for t in baselines(study) if not t.user_attrs.get("feasible")]
    layers: list[str] = []
    for t in trials:
        layers += [n for n in t.user_attrs["plan"] if n not in layers]
    order = study.user_attrs.get("layers") or layers
    layers = [n for n in order if n in layers] + [n for n in layers if n not in order]
    labels = [f"#{t.number} {t.user_attrs.get('baseline') or 'Pareto'} ({t.values[1]:.2f}x pred, "
              f"{t.user_attrs['val_acc']:.1f}%)" for t in trials]
    down = len(layers) > 12
    n_layers, n_trials = max(len(layers), 1), max(len(trials), 1)
    size = (2.5 + 1.3 * n_trials, 1.5 + 0.3 * n_layers) if down else (1.2 + 0.9 * n_layers, 1.2 + 0.45 * n_trials)
    fig, ax = plt.subplots(figsize=size)
    for i, t in enumerate(trials):
        for j, name in enumerate(layers):
            spec = t.user_attrs["plan"].get(name)
            x, y = (i, j) if down else (j, i)
            ax.add_patch(plt.Rectangle((x, y), 1, 1, facecolor=TYPE_COLORS.get(spec["type"], "grey") if spec else "white",
                                       alpha=0.25 + 0.75 * (spec or {}).get("rate", 0), edgecolor="lightgrey"))
            ax.text(x + 0.5, y + 0.5, f"{spec['rate']:.2f}" if spec else "dense", ha="center", va="center", fontsize=8)
    across, along = (labels, layers) if down else (layers, labels)
    ax.set_xlim(0, max(len(across), 1))
    ax.set_ylim(max(len(along), 1), 0)
    ax.set_xticks([i + 0.5 for i in range(len(across))], across, rotation=30 if down else 45, ha="right", fontsize=8)
    ax.set_yticks([i + 0.5 for i in range(len(along))], along, fontsize=8)
    what = "prunable layer" if not down else "trial"
    ax.set_xlabel(f"{what} (cell: rate = fraction of groups removed; colour: sparsity type)")
    ax.legend(handles=[Patch(color=c, label=k) for k, c in TYPE_COLORS.items()], fontsize=8,
              loc="upper left", bbox_to_anchor=(1.01, 1))
    ax.set_title(_title(study, "per-layer plans of the Pareto trials and baselines"), fontsize=10)
    return _save(fig, path)


# --- the report -----------------------------------------------------------------------------------


def _plan_text(plan: dict[str, Any], spelled_out: int = 6) -> str:
    """Layer by layer for a few layers; for more, each (type, rate) with its layer count, most
    layers first: resnet56's 55 layers spelled out made one table cell of 2,000 characters."""
    if len(plan) <= spelled_out:
        return ", ".join(f"{n}: {s['type']} {s['rate']:.2f}" for n, s in plan.items()) or "dense"
    groups = Counter((s["type"], s["rate"]) for s in plan.values())
    return ", ".join(f"{kind} {rate:.2f} ×{n}" for (kind, rate), n in groups.most_common()) + " (layers.png)"


def _num(value: Any, fmt: str) -> str:
    return format(value, fmt) if isinstance(value, (int, float)) else "–"


def control_text(found: dict[str, float] | None, dense: dict[str, Any], config: dict[str, Any]) -> str:
    """The constraint, and what a drop is taken from: the control, or (an older study) the dense model."""
    limit = f"constraint: a drop of at most {config.get('max_acc_drop')} points on validation"
    if not found:
        return f"- {limit} below the dense model, image by image"
    return (f"- control, the dense model trained with the trial recipe and nothing pruned: {found['val']:.2f}% "
            f"validation ({found['val'] - dense.get('val', float('nan')):+.2f} vs dense); {limit} below it, image by "
            "image: what the pruning costs, not the short recipe")


def markdown(study: optuna.Study) -> str:
    data = pareto(study)
    c, dense, s = data["config"] or {}, data["dense"] or {}, data["measured_setting"] or {}
    target = study.user_attrs.get("setting", {}).get("target", {})
    trials = study.get_trials(False)
    states = Counter(t.state.name.lower() for t in trials)
    lines = [f"# Study `{study.study_name}`: {c.get('model')} on {c.get('dataset')}", "",
             (f"- dense model: {dense.get('val', float('nan')):.2f}% validation, {dense.get('test', float('nan')):.2f}% "
              f"test accuracy"), control_text(data["control"], dense, c),
             (f"- trials: {len(trials)} ({', '.join(f'{v} {k}' for k, v in sorted(states.items()))}); each: "
              f"{c.get('admm_epochs')} ADMM + {c.get('retrain_epochs')} retraining epochs; "
              f"types {', '.join(c.get('types', []))}; sampler {c.get('sampler')}"),
             (f"- trials scored by the latency profile of {target.get('device_name', '?')} "
              f"({target.get('device', '?')}, {target.get('threads', '?')} threads)"),
             (f"- speedups measured on {s.get('device_name', '?')} ({s.get('device', '?')}, worker "
              f"{s.get('by', '?')}), batch {s.get('batch_size', '?')}, {s.get('threads', '?')} threads: "
              f"{s.get('how', 'not measured yet')}"), ladder_text(trials),
             *limit_text(trials, c.get("max_acc_drop", 1.0)), ""]
    for drop in sorted({0.5, float(c.get("max_acc_drop", 1.0))}):
        best, base = best_within(data["pareto"], drop), best_within(data["baselines"], drop)
        which = f" (trial {best['trial']})" if best else ""
        lines.append(f"- best measured speedup within {drop:g} points: "
                     f"{_num(best and best['measured_speedup'], '.2f')}x{which}; "
                     f"best uniform baseline: {_num(base and base['measured_speedup'], '.2f')}x"
                     f"{' (' + base['baseline'] + ')' if base else ''}")
    lines += ["", "![accuracy vs speedup](pareto.png)", "", "## Pareto plans", "",
              "| trial | val % | drop ± SE | P(feasible) | predicted | measured | dense ms | compacted ms | MACs | params | plan |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in data["pareto"] + [b for b in data["baselines"] if b["trial"] not in {p["trial"] for p in data["pareto"]}]:
        lat, macs, params = r.get("latency_ms", {}), r.get("macs", {}), r.get("params", {})
        lines.append(
            f"| {r['trial']}{' (' + r['baseline'] + ')' if r['baseline'] else ''} | {_num(r['val_acc'], '.2f')} | "
            f"{drop_text(r)} | {_num(r.get('feasible_confidence'), '.0%')} | {_num(r['predicted_speedup'], '.2f')}x | "
            f"{_num(r.get('measured_speedup'), '.2f')}x | {_num(lat.get('dense'), '.3f')} | {_num(lat.get('compacted'), '.3f')} | "
            f"{_num(macs.get('dense', 0) / max(macs.get('compacted', 1), 1) if macs else None, '.2f')}x fewer | "
            f"{_num(params.get('compacted'), ',')} | {_plan_text(r['plan'] or {})} |")
    lines += ["", ("Accuracy: % top-1 on the validation split, the search's only score (the test split is never "
                   "evaluated in the search: `export` reports it after full retraining). Drop: points below the "
                   "control (above) on the same images, ± its standard error from the per-image differences; P(feasible): how "
                   "sure that error makes the drop is within the limit (50% at the limit). Latency: ms per call "
                   "of the whole batch. MACs: per sample, prunable layers. Baselines that are not Pareto-optimal are "
                   "listed after the front."), "", "![predicted vs measured](predicted_vs_measured.png)", "",
              "![per-layer plans](layers.png)", ""]
    return "\n".join(lines + exported_text(data["exported"])
                     + finalized_text(data["finalized"], data["exported"], study.study_name))


def exported_text(rows: list[dict[str, Any]]) -> list[str]:
    """The report's section on exported trials: drops at trial fidelity and retrained, side by side."""
    if not rows:
        return []
    lines = ["## Retrained at the full budget (`export`)", "",
             "| trial | drop at trial fidelity (vs control) | val drop retrained (vs dense) | test drop | epochs | "
             "measured speedup |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['trial']}{f' (run {k + 1})' if (k := r.get('replicate', 0)) else ''} | {drop_text(r)} | "
              f"{retrained_text(r)} | {_num(r['test_drop'], '.2f')} | {r['epochs']} | {_num(r['speedup'], '.2f')}x |"
              for r in map(_shown, rows)]
    ratios = [r["val_drop"] / r["acc_drop"] for r in rows if (r["acc_drop"] or 0) >= 0.1 and not r.get("diverged")]
    if ratios:
        lines += ["", (f"Retrained, these plans' validation drops are {statistics.median(ratios):.2f}x their drops "
                       f"at trial fidelity (median over the {len(ratios)} whose trial lost at least 0.1 point; below "
                       "1, a limit at trial fidelity is stricter than the same limit on the exported model).")]
    return [*lines, ""]


def retrained_text(r: dict[str, Any]) -> str:
    """An exported plan's validation drop, with its paired standard error (exports before it had none),
    and each run's where it is the mean of several (`plan_runs`)."""
    if r.get("diverged"):
        return "diverged"
    runs = r.get("drops") or []
    return (f"{r['val_drop']:.2f}" + (f" ± {r['val_drop_se']:.2f}" if r.get("val_drop_se") is not None else "")
            + (f" (mean of {len(runs)} runs: {', '.join(f'{d:.2f}' for d in runs)})" if len(runs) > 1 else ""))


def sure_within(r: dict[str, Any], limit: float) -> float:
    """How sure an exported plan's paired standard error makes its retrained drop within `limit`
    (a diverged run: not at all; an export from before SEs were kept: its point estimate)."""
    return 0.0 if r.get("diverged") else confidence_within(r["val_drop"], r.get("val_drop_se") or 0.0, limit)


def margin_within(r: dict[str, Any], limit: float, confidence: float = 0.5) -> float:
    """How many points within `limit` an exported plan's retrained drop came, less the standard
    errors `confidence` asks (`confidence` in (0, 1)): negative beyond, 0 where `sure_within` is
    `confidence`. A diverged run is as far beyond as the drop recorded for it (`finalize.LOST`)."""
    se = r.get("val_drop_se") or 0.0
    return limit - r["val_drop"] - statistics.NormalDist().inv_cdf(confidence) * se


def _shown(r: dict[str, Any]) -> dict[str, Any]:
    """An exported row as the report shows it: a diverged run has no test drop or speedup."""
    return {**r, "test_drop": None, "speedup": None} if r.get("diverged") else r


def finalized_text(done: dict[str, Any] | None, rows: list[dict[str, Any]], study: str) -> list[str]:
    """The report's section on `finalize`: which plan it ships, and how many full runs that took."""
    if not done:
        return []
    runs = plan_runs(rows, done["epochs"])
    checked = [f"{n} ({retrained_text(runs[n])})" for n in done["retrained"] if n in runs]
    count = sum(len(runs[n]["drops"]) for n in done["retrained"] if n in runs)
    head = (f"Bisecting the {len(done['front'])} plans of the trials' front (accuracy vs predicted speedup, any drop "
            f"at trial fidelity) with {count} full runs of {done['epochs']} epochs"
            + (f": trials {', '.join(checked)}." if checked else ".")
            + (f" A plan at the bisection's edge within one standard error of the limit is run again at another "
               f"seed, up to {done['replicates']} runs, and judged by their mean." if done.get("replicates", 1) > 1
               else ""))
    if done["best"] is not None and done["best"] in runs:
        best = runs[done["best"]]
        sure, asked = sure_within(best, done["limit"]), done.get("confidence", 0.5)
        pick = (f"**Ship trial {best['trial']}**: retrained {retrained_text(best)} points below the dense model "
                f"({sure:.0%} sure within {done['limit']:g}; asked: {asked:.0%}), measured {best['speedup']:.2f}x; "
                f"its trial lost {drop_text(best)}.")
    else:
        pick = f"No plan of the front is within {done['limit']:g} points retrained yet."
    busy = f" (other workers retrain trials {', '.join(map(str, done['busy']))})" if done.get("busy") else ""
    more = "" if done["settled"] else (
        f" The bisection is not settled{busy}: `sparsesearch finalize {study} --max-acc-drop {done['limit']:g} "
        f"--epochs {done['epochs']}` goes on.")
    return ["## Finalized (`finalize`)", "", f"{head} {pick}{more}", ""]


def ladder_text(trials: list[FrozenTrial]) -> str:
    """How the fidelity ladder spent the study's compute: trials stopped at each rung, mean seconds."""
    stopped = Counter(len(t.user_attrs["rungs"]) for t in trials
                      if t.state == TrialState.PRUNED and "rungs" in t.user_attrs and "stopped at" in t.user_attrs.get("pruned", ""))
    spent = [t.user_attrs["train_seconds"] for t in trials if "train_seconds" in t.user_attrs]
    full = [t.user_attrs["train_seconds"] for t in trials if t.state == TrialState.COMPLETE and "train_seconds" in t.user_attrs]
    at = ", ".join(f"{n} at rung {k}" for k, n in sorted(stopped.items())) or "none"
    mean = (f"; trials trained {sum(spent) / len(spent):.0f} s on average, {sum(full) / len(full):.0f} s those run to "
            "the end" if spent and full else "")
    return (f"- fidelity ladder (rungs at {', '.join(f'{f:.0%}' for f in RUNGS)} of a trial's training; a trial "
            f"goes on if it ranks in the best 1/{ETA} of the trials predicted at least as fast): stopped {at}{mean}")


def limit_text(trials: list[FrozenTrial], limit: float) -> list[str]:
    """The limit the latest trials were judged at, where full runs raised it (`search.trial_limit`)."""
    latest = next((t.user_attrs["trial_limit"] for t in reversed(trials) if "trial_limit" in t.user_attrs), limit)
    return [f"- trials judged promising within {latest:.2f} points, not {limit:g}: full runs of this study's plans "
            "came within the limit after trials that lost that much"] if latest > limit else []


def drop_text(r: dict[str, Any]) -> str:
    """A drop with its standard error, as the report and the CLI print it."""
    se = r.get("acc_drop_se")
    return _num(r["acc_drop"], ".2f") + (f" ± {se:.2f}" if se is not None else "")


def write(study: optuna.Study, out_dir: Path) -> list[Path]:
    """pareto.json, pareto.png, predicted_vs_measured.png, layers.png and report.md in `out_dir`."""
    import matplotlib

    matplotlib.use("Agg")
    out_dir = Path(out_dir)
    write_json(out_dir / "pareto.json", pareto(study))
    paths = [out_dir / "pareto.json", plot_pareto(study, out_dir / "pareto.png"),
             plot_predicted_vs_measured(study, out_dir / "predicted_vs_measured.png"),
             plot_layers(study, out_dir / "layers.png")]
    text = markdown(study)
    save_with(out_dir / "report.md", lambda tmp: tmp.write_text(text))
    return [*paths, out_dir / "report.md"]
