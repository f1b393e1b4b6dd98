"""The latency model: a regressor fitted on a latency table, and end-to-end predictions with it.

Each compact layer is described by its signature, what runs (plain dense layer or a kernel), its kept
dims and the weights it multiplies; the target is log latency, so errors are relative. A gradient-
boosted tree ensemble constrained to be non-decreasing in kept inputs, kept outputs, weights and
MACs interpolates between the grid points the profiler measured. A network's latency is the sum of
its predicted layers plus the measured rest of the network (everything that is not a prunable layer).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import UserError
from ..layers import trace
from ..plan import Plan
from .build import PLAIN, describe
from .table import Profile, Row, Signature, model_key

FAMILIES = ("plain", "reduced-gemm", "channels-gathered", "csr", "dense-fallback", "semi-structured")
# (name, monotone direction): +1 where more kept work can only cost more
FEATURES = (("conv", 0), ("log_in", 1), ("log_out", 1), ("log_groups", 0), ("kernel", 0), ("stride", 0),
            ("log_positions", 0), ("log_input_hw", 0), ("log_full_in", 0), ("log_full_out", 0),
            ("density", 1), ("log_macs", 1), ("log_dense_macs", 1),
            *((f"is_{f}", 0) for f in FAMILIES))


@dataclass(frozen=True)
class Query:
    """A compact layer to predict: the signature of the layer it came from and what it became."""

    signature: Signature
    family: str
    in_keep: int
    out_keep: int
    groups_keep: int
    weights: int

    @classmethod
    def of_row(cls, row: Row) -> Query:
        family = PLAIN if row.type == PLAIN else row.impl
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

    max_iter: int = 300
    learning_rate: float = 0.08
    max_leaf_nodes: int = 15
    min_samples_leaf: int = 3
    folds: int = 5
    profile: Profile | None = field(default=None, repr=False)
    cv_error: dict[str, float] = field(default_factory=dict)  # relative errors of held-out rows
    _scales: dict[str, float] = field(default_factory=dict, repr=False)  # network -> in-network scale

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

    def rest_ms(self, model: nn.Module, input_shape: tuple[int, ...]) -> float:
        key = model_key(model, input_shape)
        if key not in self.profile.rest:
            names = sorted({str(v["model"]) for v in self.profile.rest.values()})
            raise UserError(f"profile {self.profile.path} has not timed the rest of this network "
                            f"({'x'.join(map(str, input_shape))} input; it holds {', '.join(names) or 'none'}); "
                            "run `sparsesearch profile --model MODEL` on this device to add it")
        return float(self.profile.rest[key]["median_ms"])

    def scale(self, model: nn.Module, input_shape: tuple[int, ...]) -> float:
        """What the prunable layers of this network cost inside it over their isolated timings: the
        median, over the profile's calibration plans, of (measured - rest) / sum of predicted layers;
        1 for a profile without them."""
        key = model_key(model, input_shape)
        if key not in self._scales:
            ratios = []
            for sample in self.profile.rest.get(key, {}).get("calibration", []):
                plan = Plan.from_dict(sample["plan"], f"calibration plan in {self.profile.path}")
                raw = predict_latency(self, model, input_shape, plan, scaled=False)
                ratios.append((sample["median_ms"] - raw.rest_ms) / sum(raw.layers_ms.values()))
            self._scales[key] = float(np.median(ratios)) if ratios else 1.0
        return self._scales[key]


def latency_model_for(model: nn.Module, input_shape: tuple[int, ...], device: torch.device, batch_size: int,
                      dtype: str = "float32", path: Path | None = None, allow_foreign: bool = False) -> LatencyModel:
    """The latency model of the profile at `path`, or of the one under hardware_profiles/ that was
    measured on this device and setting and holds this network; refuses a foreign profile."""
    from .table import PROFILES_DIR, find_profile, fingerprint, load_profile

    if path is None:
        path = find_profile(fingerprint(device, batch_size, dtype), PROFILES_DIR, model_key(model, input_shape))
    return LatencyModel().fit(load_profile(path, device, batch_size, dtype, allow_foreign))


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


def predict_compacted(latency: LatencyModel, original: nn.Module, compacted: nn.Module,
                      input_shape: tuple[int, ...], scaled: bool = True) -> Prediction:
    """Sum of the predicted layers of a compacted model, scaled to in-network cost (`LatencyModel.scale`),
    plus the measured rest of the original."""
    found = queries(original, compacted, input_shape)
    missing = missing_signatures(latency, found)
    if missing:
        name, key = next(iter(missing.items()))
        raise UserError(f"profile {latency.profile.path} has no rows for {len(missing)} layer(s) of this network "
                        f"(e.g. {name}: {key}); run `sparsesearch profile --model MODEL` on this device to add them")
    scale = latency.scale(original, input_shape) if scaled else 1.0
    ms = {name: scale * t for name, t in zip(found, latency.predict(list(found.values())))}
    rest = latency.rest_ms(original, input_shape)
    return Prediction(sum(ms.values()) + rest, rest, ms)


def predict_latency(latency: LatencyModel, model: nn.Module, input_shape: tuple[int, ...], plan: Plan,
                    scaled: bool = True) -> Prediction:
    """Predicted latency of `model` pruned by `plan` and compacted (on a copy: projections, then
    `compact()`, so the kept dims are exactly the ones compaction will produce)."""
    from ..admm import apply_masks, prune_masks
    from ..compact import compact, dependencies

    masked = copy.deepcopy(model).cpu().float().eval()
    deps = dependencies(masked, input_shape)
    plan.validate(trace(masked, input_shape), deps.couplings)
    apply_masks(masked, prune_masks(masked, plan, deps))
    compacted = compact(masked, plan, input_shape).model
    return predict_compacted(latency, masked, compacted, input_shape, scaled)


def dense_latency(latency: LatencyModel, model: nn.Module, input_shape: tuple[int, ...]) -> Prediction:
    """Predicted latency of the unpruned model, on the same footing as `predict_latency`."""
    return predict_compacted(latency, model, model, input_shape)
