"""The latency model: a regressor fitted on a latency table, and end-to-end predictions with it.

Each compact layer is described by its signature, what runs (plain dense layer or a kernel), its kept
dims and the weights it multiplies; the target is log latency, so errors are relative. A gradient-
boosted tree ensemble constrained to be non-decreasing in kept inputs, kept outputs, weights and
MACs interpolates between the grid points the profiler measured. A network's latency is an offset
plus, per layer, a slope times its predicted latency, a cost per weight kept, a cost per output
element (the normalisation, activation and additions that follow it) and, for a kernel layer, a cost
per input element it reads: read off each profiled network's end-to-end timings (dense, and random
plans compacted), it carries the rest of the network and what being inside it costs a layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch
from torch import nn

from ..compact import BRANCH_REMOVED, COLLAPSED
from ..errors import UserError
from ..layers import trace
from ..plan import Plan
from ..runtime import DEFAULT_LAYOUT
from .build import PLAIN, describe
from .table import Profile, Row, Signature, model_key

if TYPE_CHECKING:
    from ..graph import Dependencies

FAMILIES = ("plain", "reduced-gemm", "channels-gathered", "csr", "semi-structured")
# (name, monotone direction): +1 where more kept work can only cost more
FEATURES = (("conv", 0), ("log_in", 1), ("log_out", 1), ("log_groups", 0), ("kernel", 0), ("stride", 0),
            ("log_positions", 0), ("log_input_hw", 0), ("log_full_in", 0), ("log_full_out", 0),
            ("density", 1), ("log_macs", 1), ("log_dense_macs", 1),
            *((f"is_{f}", 0) for f in FAMILIES))
MIN_PLANS_PER_TERM = 3  # end-to-end timings per coefficient of the in-network fit before it gets per-kernel terms
DENSE_WEIGHT = 100.0  # the dense network's residual in the in-network fit, against 1 for a plan: held to it


@dataclass(frozen=True)
class Query:
    """A compact layer to predict: the signature of the layer it came from and what it became."""

    signature: Signature
    family: str
    in_keep: int
    out_keep: int
    groups_keep: int
    weights: int

    def description(self) -> list[object]:
        """What the layer became, without its signature: how a profile stores a calibration plan's layers."""
        return [self.family, self.in_keep, self.out_keep, self.groups_keep, self.weights]

    @classmethod
    def of_description(cls, signature: Signature, raw: list[object]) -> Query:
        family, in_keep, out_keep, groups_keep, weights = raw
        least = 0 if family == BRANCH_REMOVED else 1  # a removed layer keeps no output
        if not isinstance(family, str) or not all(isinstance(n, int) and n >= least
                                                  for n in (in_keep, out_keep, groups_keep)):
            raise ValueError(f"not [family, in, out, groups, weights]: {str(raw)[:60]}")
        return cls(signature, family, in_keep, out_keep, groups_keep, int(weights))

    @classmethod
    def of_row(cls, row: Row) -> Query:
        family = PLAIN if row.type == PLAIN or row.impl == "dense-fallback" else row.impl
        return cls(row.signature, family, row.in_keep, row.out_keep, row.groups_keep, row.weights)


def features(q: Query) -> list[float]:
    sig = q.signature
    kernel = sig.kernel[0] * sig.kernel[1]
    dense = max(q.out_keep * (q.in_keep // max(q.groups_keep, 1)) * kernel, 1)
    log = math.log2
    return [float(sig.kind == "conv"), log(q.in_keep), log(q.out_keep), log(q.groups_keep), kernel, sig.stride[0],
            log(sig.positions), log(sig.input_hw[0] * sig.input_hw[1]), log(sig.in_channels), log(sig.out_channels),
            q.weights / dense, log(max(q.weights, 1) * sig.positions), log(dense * sig.positions),
            *(float(q.family == f) for f in FAMILIES)]


@dataclass
class LatencyModel:
    """A scikit-learn regressor of log latency on a profile's rows; `fit` also cross-validates it."""

    max_iter: int = 500
    learning_rate: float = 0.08
    max_leaf_nodes: int = 31  # 15 left tv:resnet18's rows 4.3% off in-sample (median), 31: 2.7%
    min_samples_leaf: int = 3
    folds: int = 5
    profile: Profile | None = field(default=None, repr=False)
    cv_error: dict[str, float] = field(default_factory=dict)  # relative errors of held-out rows
    _in_network: dict[str, InNetwork] = field(default_factory=dict, repr=False)  # network key -> its fit

    def _estimator(self):  # noqa: ANN202 - a scikit-learn regressor
        from sklearn.ensemble import HistGradientBoostingRegressor

        return HistGradientBoostingRegressor(
            max_iter=self.max_iter, learning_rate=self.learning_rate, max_leaf_nodes=self.max_leaf_nodes,
            min_samples_leaf=self.min_samples_leaf, monotonic_cst=[m for _, m in FEATURES], random_state=0)

    def fit(self, profile: Profile) -> LatencyModel:
        from sklearn.model_selection import KFold, cross_val_predict
        from threadpoolctl import threadpool_limits

        rows = list(profile.rows.values())
        if len(rows) < 2 * self.folds:
            raise UserError(f"profile {profile.path} has {len(rows)} rows, too few to fit a latency model; "
                            "run `sparsesearch profile` for a model first")
        x = np.array([features(Query.of_row(r)) for r in rows])
        y = np.log(np.array([r.median_ms for r in rows]))
        # one thread: a few hundred rows need no more, and OpenMP threads on a busy machine crawl
        with threadpool_limits(1):
            held_out = cross_val_predict(self._estimator(), x, y, cv=KFold(self.folds, shuffle=True, random_state=0))
            self.estimator_ = self._estimator().fit(x, y)
        error = np.abs(np.exp(held_out - y) - 1)
        self.cv_error = {"mean_abs": float(error.mean()), "median_abs": float(np.median(error)),
                         "p90_abs": float(np.quantile(error, 0.9)), "within_10": float((error <= 0.1).mean()),
                         "rows": len(rows), "folds": self.folds}
        self.profile = profile
        return self

    def predict(self, queries: list[Query]) -> list[float]:
        """Predicted median latency (ms per call of the whole batch) of each compact layer."""
        if not queries:
            return []
        return np.exp(self.estimator_.predict(np.array([features(q) for q in queries]))).tolist()

    def network(self, model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, object]:
        """What the profile timed of this whole network: its rest, the dense net, calibration plans."""
        entry = self.profile.rest.get(model_key(model, input_shape))
        if entry is None:
            names = sorted({str(v["model"]) for v in self.profile.rest.values()})
            raise UserError(f"profile {self.profile.path} has not timed this network end to end "
                            f"({'x'.join(map(str, input_shape))} input; it holds {', '.join(names) or 'none'}); "
                            "run `sparsesearch profile --model MODEL` on this device to add it")
        return entry

    def dense_ms(self, model: nn.Module, input_shape: tuple[int, ...]) -> float:
        """The unpruned network's latency as the profile measured it: the reference of every predicted
        speedup (the in-network fit is for pruned plans; a line once put the dense resnet20 20% high)."""
        return float(self.network(model, input_shape)["dense_ms"])

    def in_network(self, model: nn.Module, input_shape: tuple[int, ...]) -> InNetwork:
        """How this network's end-to-end latency follows its predicted layers, fitted on the plans
        the profile timed end to end (calibration plans and the dense network). `model` must be
        unpruned: the plans are compacted from it, and a pruned one's dead filters would leave
        other dims (on lenet5, none: a crash)."""
        key = model_key(model, input_shape)
        if key not in self._in_network:
            entry = self.network(model, input_shape)
            layers = [isolated_layers(self, model, model, input_shape)]
            measured = [float(entry["dense_ms"])]
            signatures = {layer.name: Signature.of(model.get_submodule(layer.name), layer.in_shape)
                          for layer in trace(model, input_shape)}
            for sample in entry.get("calibration", []):
                layers.append(self.isolated(self._calibrated(sample, model, input_shape, signatures)))
                measured.append(float(sample["median_ms"]))
            self._in_network[key] = InNetwork.fit([list(found.values()) for found in layers], measured,
                                                  float(entry["median_ms"]))
        return self._in_network[key]


    def _calibrated(self, sample: dict[str, object], model: nn.Module, input_shape: tuple[int, ...],
                    signatures: dict[str, Signature]) -> dict[str, Query]:
        """What each layer (of `signatures`) became in a calibration plan: as the profile described
        it when it compacted the plan, or (a profile from before it did) compacted again, a second
        or more per plan on tv:resnet18."""
        where = f"calibration plan in {self.profile.path}"
        if "layers" not in sample:
            plan = Plan.from_dict(sample["plan"], where)
            return queries(model, compacted_copy(model, input_shape, plan), input_shape)
        try:
            return {name: Query.of_description(sig, sample["layers"][name]) for name, sig in signatures.items()}
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"{where} has a malformed layer description ({e}); "
                            "re-run `sparsesearch profile` to rewrite it") from e

    def isolated(self, found: dict[str, Query]) -> dict[str, Isolated]:
        """Each layer's predicted isolated latency; one that no row's signature matches is refused."""
        missing = missing_signatures(self, found)
        if missing:
            name, key = next(iter(missing.items()))
            raise UserError(f"profile {self.profile.path} has no rows for {len(missing)} layer(s) of this network "
                            f"(e.g. {name}: {key}); run `sparsesearch profile --model MODEL` on this device to add them")
        run = {name: q for name, q in found.items() if q.family not in (BRANCH_REMOVED, COLLAPSED)}
        ms = dict(zip(run, self.predict(list(run.values()))))
        return {name: _REMOVED if q.family == BRANCH_REMOVED else
                Isolated(ms.get(name, 0.0), q.weights, q.family, q.out_keep * q.signature.positions,
                         q.in_keep * math.prod(q.signature.input_hw))
                for name, q in found.items()}


class Isolated(NamedTuple):
    """A compact layer as the latency model sees it alone: predicted latency, weights, what runs,
    and the elements it writes and reads per sample."""

    ms: float
    weights: int
    family: str
    outputs: int
    inputs: int


# A layer of a removed residual branch costs nothing. What still runs where the branch joined (the
# addition, the activation, the calls that stand in for its layers) is less than the calls the branch's
# layers made, which the in-network fit's offset holds: on resnet56 (AMD EPYC, 1 thread, batch 1) 4, 8
# and 12 of 24 blocks removed were predicted at 1.14x, 1.31x and 1.54x and measured at 1.11-1.12x,
# 1.28-1.40x and 1.58-1.62x (charged the dense layers' outputs as well: 1.10x, 1.22x, 1.38x).
_REMOVED = Isolated(0.0, 0, BRANCH_REMOVED, 0, 0)
# A collapsed layer (`compact.ChannelAffine`) runs no kernel the profile timed, and saves a layer's
# calls as a removed branch does (a conv and a BatchNorm become one multiply-add): the in-network fit
# charges it only the elements it writes, and counts it among the calls a plan saves.


@dataclass(frozen=True)
class InNetwork:
    """End-to-end latency = offset + the sum over the layers of (slope + per_ms[family]) x (isolated
    latency) + per_mweight x (millions of weights kept) + per_moutput x (millions of elements written)
    + per_minput[family] x (millions of elements read); per_ms and per_minput are for layers that run
    a kernel.

    Inside a network a layer runs slower than timed alone, and the rest of the network shrinks with
    the channels it carries; both are read off plans timed end to end. The rest is mostly the
    normalisation, activation and residual additions applied to each layer's output, so it follows
    the elements the layers write: filter pruning shrinks it, channel and shape pruning do not (on
    tv:resnet18 at 224 px a constant offset under-predicted plans of many filter-pruned layers by up
    to 18%; per output element, 97-100% of 30 random plans within 10%). Timed alone, a layer reads its
    weights from cache; inside a network whose weights exceed the cache (tv:resnet18: 43 MB against a
    32 MB L3) each call streams them from memory again, a cost that follows the weights kept. A
    kernel layer (CSR, im2col GEMM, gathered channels) copies its input, which inside a network
    arrives from memory rather than a warm cache: a cost per input element, fitted per family when
    there are plans enough (MIN_PLANS_PER_TERM per coefficient; a constant per call fitted worse, as
    the inputs range over 200x). A kernel layer's isolated latency also grows by its own factor inside
    a network (per_ms): with one slope for all layers, a fit that held the search's uniform filter
    ladder to 0-6% put filter-heavy random plans of resnet56 12-19% fast; refitted on the same
    timings with per_ms, 87% and 100% of random plans within 10% (were 80%, 87%; 3x32x32 and 1x32x32
    input) and the ladder within 4%, and on an earlier session's draws resnet56 / tv:resnet18 /
    tv:mobilenet_v2 at mean speedup errors 1.9 / 2.7 / 4.0% (were 2.9 / 3.4 / 4.4%). The form was
    chosen on those timings; a fresh draw, with the machine at 1.54x its profiled dense latency,
    scored 60% (one slope: 53%). The fit is robust (soft-L1 loss), so one plan timed during a burst
    of load does not tilt it, and every coefficient is non-negative."""

    offset: float  # ms: the plan-independent part (the rest of the network and its overheads)
    slope: float  # in-network cost of a millisecond of isolated layer time
    plans: int  # end-to-end timings it was fitted on
    per_mweight: float = 0.0  # ms per million weights kept: streaming weights that do not stay in cache
    per_moutput: float = 0.0  # ms per million elements written: what follows a layer on its output
    per_minput: dict[str, float] = field(default_factory=dict)  # kernel family -> ms per million elements read
    per_ms: dict[str, float] = field(default_factory=dict)  # kernel family -> further ms per isolated ms
    per_call: float = 0.0  # ms per layer that runs: the calls around it (normalisation, activation, addition)

    def cost(self, layer: Isolated) -> float:
        """A layer's share of the end-to-end latency."""
        if layer.family == BRANCH_REMOVED:
            return 0.0
        call = 0.0 if layer.family == COLLAPSED else self.per_call
        return ((self.slope + self.per_ms.get(layer.family, 0.0)) * layer.ms + call
                + (self.per_mweight * layer.weights + self.per_moutput * layer.outputs
                   + self.per_minput.get(layer.family, 0.0) * layer.inputs) / 1e6)

    @classmethod
    def fit(cls, networks: list[list[Isolated]], measured: list[float], rest_ms: float) -> InNetwork:
        """The fit through the networks' isolated layers and their measured end-to-end latencies,
        held to the first, the dense network: every predicted speedup divides its measured latency,
        so a fit that missed it biased them all (resnet56: the dense net fitted 14% slow and uniform
        filter 10% predicted slower than dense; calibration plans, mostly mixed types, leave the
        unpruned end loose). Residuals are relative: in milliseconds the fast plans, which weigh
        little, went unfitted (vgg16-bn's uniform filter 90%, 1 ms against 14 dense, predicted at
        0.79x its measured speedup; fitted relatively 0.87-0.92x, and random plans within 10% 97%
        instead of 87-93%). With fewer than four distinct layer sums (a profile of rate 0 only), or a
        fit with no slope, the measured rest plus the median in-network ratio."""
        from scipy.optimize import least_squares

        families = sorted({layer.family for net in networks for layer in net} - {PLAIN, BRANCH_REMOVED, COLLAPSED})
        calls = [sum(layer.family not in (BRANCH_REMOVED, COLLAPSED) for layer in net) for net in networks]
        fewer = sum(n < max(calls) for n in calls) >= MIN_PLANS_PER_TERM  # else the offset holds the calls
        base = 4 + fewer
        if len(networks) < MIN_PLANS_PER_TERM * (base + len(families)):
            families = []
        slopes = families if len(networks) >= MIN_PLANS_PER_TERM * (base + 2 * len(families)) else []

        def terms(net: list[Isolated], n: int) -> list[float]:
            return [1.0, sum(layer.ms for layer in net), sum(layer.weights for layer in net) / 1e6,
                    sum(layer.outputs for layer in net) / 1e6, *([float(n)] if fewer else []),
                    *(sum(layer.inputs for layer in net if layer.family == f) / 1e6 for f in families),
                    *(sum(layer.ms for layer in net if layer.family == f) for f in slopes)]

        x = np.array([terms(net, n) for net, n in zip(networks, calls)])
        sums = x[:, 1]
        y = np.asarray(measured, dtype=float)
        if len(np.unique(np.round(sums, 6))) >= 4:
            start = np.maximum(np.linalg.lstsq(x, y, rcond=None)[0], 1e-9)
            weight = 1 / y  # relative residuals, as speedups are ratios
            weight[0] *= DENSE_WEIGHT
            found = least_squares(lambda p: weight * (x @ p - y), start, bounds=(0, np.inf), loss="soft_l1",
                                  f_scale=0.03)
            offset, slope, per_mweight, per_moutput, *rest = map(float, found.x)
            per_call = rest.pop(0) if fewer else 0.0
            if slope > 0:
                return cls(offset, slope, len(y), per_mweight, per_moutput, dict(zip(families, rest)),
                           dict(zip(slopes, rest[len(families):])), per_call)
        return cls(rest_ms, float(np.median((y - rest_ms) / sums)), len(y))


def latency_model_for(model: nn.Module, input_shape: tuple[int, ...], device: torch.device, batch_size: int,
                      dtype: str = "float32", path: Path | None = None, allow_foreign: bool = False,
                      target: bool = False, layout: str = DEFAULT_LAYOUT) -> LatencyModel:
    """The latency model of the profile at `path`, or of the one (`find_profile`) that was
    measured on this device and setting (memory `layout` included) and holds this network; refuses
    a foreign profile unless it is the `target` device's (see `Profile.check`)."""
    from .table import find_profile, fingerprint, load_profile

    if path is None:
        path = find_profile(fingerprint(device, batch_size, dtype, layout=layout), network=model_key(model, input_shape))
    return LatencyModel().fit(load_profile(path, device, batch_size, dtype, allow_foreign, target=target,
                                           layout=layout))


@dataclass
class Prediction:
    total_ms: float
    rest_ms: float
    layers_ms: dict[str, float]


def _seen_channels(model: nn.Module, names: list[str], input_shape: tuple[int, ...]) -> dict[str, tuple[int, int]]:
    """Channels (features) each named layer reads and writes, from one forward whose hooks are removed."""
    seen: dict[str, tuple[int, int]] = {}

    def record(name: str):  # noqa: ANN202
        def hook(_m: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            axis = 1 if out.dim() == 4 else -1
            seen.setdefault(name, (args[0].shape[axis], out.shape[axis]))
        return hook

    handles = [model.get_submodule(n).register_forward_hook(record(n)) for n in names]
    try:
        with torch.inference_mode():
            model.eval()(torch.zeros(1, *input_shape, device=next(model.parameters()).device))
    finally:
        for h in handles:
            h.remove()
    return seen


def queries(original: nn.Module, compacted: nn.Module, input_shape: tuple[int, ...]) -> dict[str, Query]:
    """What each prunable layer of `original` became in `compacted` (same layer names)."""
    layers = trace(original, input_shape)
    channels = _seen_channels(compacted, [layer.name for layer in layers], input_shape)
    found = {}
    for layer in layers:
        sig = Signature.of(original.get_submodule(layer.name), layer.in_shape)
        d = describe(compacted.get_submodule(layer.name), *channels[layer.name])
        found[layer.name] = Query(sig, d.family, d.in_keep, d.out_keep, d.groups_keep, d.weights)
    return found


def missing_signatures(latency: LatencyModel, found: dict[str, Query]) -> dict[str, str]:
    """Layers whose signature the profile never measured, as layer -> signature key."""
    known = {r.signature for r in latency.profile.rows.values()}
    return {n: q.signature.key for n, q in found.items() if q.signature not in known}


def isolated_layers(latency: LatencyModel, original: nn.Module, compacted: nn.Module,
                    input_shape: tuple[int, ...]) -> dict[str, Isolated]:
    """Each prunable layer of `original` as it is in `compacted`, with its predicted isolated latency."""
    return latency.isolated(queries(original, compacted, input_shape))


def predict_compacted(latency: LatencyModel, original: nn.Module, compacted: nn.Module,
                      input_shape: tuple[int, ...]) -> Prediction:
    """End-to-end latency of `original` (the unpruned network: the in-network fit compacts its
    calibration plans from it) as `compacted`: its predicted layers inside the network
    (`InNetwork`); `rest_ms` is the fit's offset, `layers_ms` each layer's in-network share."""
    fit = latency.in_network(original, input_shape)
    ms = {name: fit.cost(layer) for name, layer in isolated_layers(latency, original, compacted, input_shape).items()}
    return Prediction(fit.offset + sum(ms.values()), fit.offset, ms)


def compacted_copy(model: nn.Module, input_shape: tuple[int, ...], plan: Plan, deps: Dependencies | None = None
                   ) -> nn.Module:
    """`model` pruned by `plan` on a copy and compacted (`compact.pruned`), so the kept dims are
    exactly the ones compaction will produce."""
    from ..compact import pruned

    return pruned(model, input_shape=input_shape, plan=plan, deps=deps)[1].model


def predict_latency(latency: LatencyModel, model: nn.Module, input_shape: tuple[int, ...], plan: Plan) -> Prediction:
    """Predicted latency of `model` pruned by `plan` and compacted."""
    return predict_compacted(latency, model, compacted_copy(model, input_shape, plan), input_shape)


def dense_latency(latency: LatencyModel, model: nn.Module, input_shape: tuple[int, ...]) -> Prediction:
    """Predicted latency of the unpruned model, on the same footing as `predict_latency`."""
    return predict_compacted(latency, model, model, input_shape)
