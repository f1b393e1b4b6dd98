"""The latency table: measured compact layers keyed by layer signature, with the device fingerprint.

A row says: a layer of this signature (kind, channels, kernel, stride, padding, groups, input size),
compacted for this sparsity type to these kept dims, ran this implementation in this median time on
the device of the fingerprint. Rows never name a model, so one profile serves every model whose
layers share shapes; the one per-model entry is the measured time of the non-prunable rest.
The file is JSON with a `schema` field, written atomically; `hardware_profiles/README.md` has it.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from ..errors import UserError
from ..files import read_json, write_json
from ..kernels import KERNEL_VERSIONS
from ..layers import Layer
from ..runtime import DEFAULT_LAYOUT
from ..sparsity import LAYER_LOCAL, SparsityType

SCHEMA = 2  # 2: latencies are scaled to the yardstick's speed when the profile was started
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Profiles of known machines shipped with the source: read, never written (a run that adds rows
# starts a copy in `profiles_dir()`).
SHIPPED_PROFILES = Path(__file__).resolve().parents[2] / "hardware_profiles"
PAYS = 1.1  # how much faster than dense a compact form must run to count as paying (timing noise is ~5%)


def profiles_dir() -> Path:
    """Where profiles are written and looked up first: $SPARSESEARCH_PROFILES, else hardware_profiles/
    in the working directory, as studies/ and checkpoints/ are (from the repository's root, that is
    the shipped folder itself)."""
    return Path(os.environ.get("SPARSESEARCH_PROFILES", "hardware_profiles"))


# what must agree for a profile's numbers to hold here; date, versions of other libraries and the
# environment are recorded but not compared
MATCHED = ("device", "device_name", "capability", "threads", "batch_size", "dtype", "torch", "layout")
SETTING = ("batch_size", "dtype", "layout")  # what a profile predicts: a target device's must agree on these too
BEFORE = {"layout": DEFAULT_LAYOUT}  # what a profile written before a field existed was measured with
# recorded, not matched: each changes latencies (OMP_WAIT_POLICY=PASSIVE made resnet20 at 2 threads 3x slower)
_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY",
        "GOMP_SPINCOUNT", "KMP_BLOCKTIME")


@dataclass(frozen=True)
class Signature:
    """What fixes a prunable layer's cost before pruning: its kind, shape and input size."""

    kind: str  # "conv" or "linear"
    in_channels: int
    out_channels: int
    kernel: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    bias: bool = False
    input_hw: tuple[int, int] = (1, 1)  # conv: H x W of the input; linear: (tokens, 1)

    @classmethod
    def of(cls, module: nn.Module, in_shape: tuple[int, ...]) -> Signature:
        """The signature of a Conv2d or Linear seeing one sample of shape `in_shape`."""
        if isinstance(module, nn.Conv2d):
            padding = module.padding
            if isinstance(padding, str):  # "valid" pads nothing; "same" pads (d*(k-1))//2 per side (odd k)
                padding = tuple(0 if padding == "valid" else d * (k - 1) // 2
                                for d, k in zip(module.dilation, module.kernel_size))
            return cls("conv", module.in_channels, module.out_channels, tuple(module.kernel_size),
                       tuple(module.stride), tuple(padding), tuple(module.dilation), module.groups,
                       module.bias is not None, tuple(in_shape[-2:]))
        tokens = int(torch.Size(in_shape[:-1]).numel())
        return cls("linear", module.in_features, module.out_features, bias=module.bias is not None,
                   input_hw=(tokens, 1))

    @property
    def key(self) -> str:
        """A readable unique key, e.g. conv 16>32 k3x3 s2x2 p1x1 d1x1 g1 @32x32."""
        def x(pair: tuple[int, int]) -> str:
            return f"{pair[0]}x{pair[1]}"
        head = f"{self.kind} {self.in_channels}>{self.out_channels}"
        if self.kind == "linear":
            return f"{head}{' +b' if self.bias else ''} @{self.input_hw[0]}"
        return (f"{head} k{x(self.kernel)} s{x(self.stride)} p{x(self.padding)} d{x(self.dilation)} "
                f"g{self.groups}{' +b' if self.bias else ''} @{x(self.input_hw)}")

    @property
    def output_hw(self) -> tuple[int, int]:
        if self.kind == "linear":
            return self.input_hw
        return tuple((n + 2 * p - d * (k - 1) - 1) // s + 1  # type: ignore[return-value]
                     for n, p, d, k, s in zip(self.input_hw, self.padding, self.dilation, self.kernel, self.stride))

    @property
    def positions(self) -> int:
        """Output positions each weight is applied at, per sample."""
        h, w = self.output_hw
        return h * w

    def to_dict(self) -> dict[str, object]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, raw: dict[str, object]) -> Signature:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})  # type: ignore[arg-type]


@dataclass(frozen=True)
class Row:
    """One measured compact layer.

    `type` is what was built: "plain" (a dense conv/linear of the kept dims: what filter pruning,
    channel pruning with the channels removed, and unpruned layers all run), or shape, irregular, nm,
    or channel when the kept inputs are gathered. `weights` counts the weights the kernel uses.
    """

    signature: Signature
    type: str
    rate: float  # the pattern's rate (plain: 0); kept dims are in in_keep/out_keep/groups_keep
    in_keep: int
    out_keep: int
    groups_keep: int
    weights: int
    impl: str
    macs: int  # per sample: weights x positions
    median_ms: float
    spread: float

    @property
    def key(self) -> tuple[str, str, float, int, int, int]:
        return point_key(self.signature, self.type, self.rate, self.in_keep, self.out_keep, self.groups_keep)

    def to_dict(self) -> dict[str, object]:
        return {"signature": self.signature.to_dict(), **{k: v for k, v in asdict(self).items() if k != "signature"}}

    @classmethod
    def from_dict(cls, raw: dict[str, object]) -> Row:
        values = dict(raw)
        return cls(Signature.from_dict(values.pop("signature")), **values)  # type: ignore[arg-type]


def point_key(signature: Signature, type_: str, rate: float, in_keep: int, out_keep: int,
              groups_keep: int) -> tuple[str, str, float, int, int, int]:
    """What makes two rows the same measurement (so a re-run skips it)."""
    return (signature.key, type_, round(rate, 4), in_keep, out_keep, groups_keep)


def fingerprint(device: torch.device, batch_size: int, dtype: str, threads: int | None = None,
                layout: str = DEFAULT_LAYOUT) -> dict[str, object]:
    """The device and setting a profile was measured with (`layout`: the memory layout every network
    ran in, `runtime.LAYOUTS`); MATCHED fields must agree to reuse it."""
    from ..runtime import machine, versions

    cuda = device.type == "cuda"
    stamp = machine()
    return {
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if cuda else str(stamp["processor"]),
        "capability": ".".join(map(str, torch.cuda.get_device_capability(device))) if cuda else "none",
        "threads": threads or torch.get_num_threads(),
        "batch_size": batch_size,
        "dtype": dtype,
        "layout": layout,
        "torch": torch.__version__,
        "cuda": versions()["cuda"],
        "cores": stamp["cores"],
        "platform": stamp["platform"],
        "env": {k: os.environ[k] for k in _ENV if k in os.environ},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def differences(theirs: dict[str, object], ours: dict[str, object]) -> list[str]:
    """The MATCHED fields on which two fingerprints disagree, as 'field: theirs != ours'."""
    theirs, ours = ({**BEFORE, **fp} for fp in (theirs, ours))
    return [f"{k}: {theirs.get(k)} (profile) != {ours.get(k)} (here)" for k in MATCHED if theirs.get(k) != ours.get(k)]


def without_unpaid(model: nn.Module, layers: list[Layer], unpaid: set[tuple[str, str]]) -> list[Layer]:
    """`layers` of `model` less the types that buy no time on a profile's device (`Profile.unpaid`):
    what the search can give each, so what calibration and validation plans draw from."""
    def offered(layer: Layer) -> tuple[SparsityType, ...]:
        key = Signature.of(model.get_submodule(layer.name), layer.in_shape).key
        return tuple(t for t in layer.types if (key, t.value) not in unpaid)

    return [replace(layer, types=offered(layer)) for layer in layers]


def model_key(model: nn.Module, input_shape: tuple[int, ...]) -> str:
    """A structural key for a network (not its name): two builds of one architecture share it."""
    text = repr(model) + "|" + "x".join(map(str, input_shape))
    return hashlib.sha1(text.encode()).hexdigest()[:16]


@dataclass
class Profile:
    """A latency table on one device: rows, the measured rest of each profiled network, fingerprint."""

    fingerprint: dict[str, object]
    rows: dict[tuple, Row] = field(default_factory=dict)
    rest: dict[str, dict[str, object]] = field(default_factory=dict)  # model key -> {model, input_shape, median_ms, ...}
    timing: dict[str, object] = field(default_factory=dict)
    path: Path | None = None
    yardstick_ms: float | None = None  # the yardstick when this profile was started (schema 1: none)
    steps: dict[str, object] = field(default_factory=dict)  # `steps.scan`: channel periods "out", "in"
    kernels: dict[str, int] = field(default_factory=lambda: dict(KERNEL_VERSIONS))  # versions its rows ran

    def add(self, row: Row) -> None:
        self.rows[row.key] = row

    def stale(self) -> list[str]:
        """The kernels (`impl`) some row ran in an older version than this sparsesearch's: their
        latencies are not what the layers cost now."""
        return sorted({r.impl for r in self.rows.values() if self.kernels.get(r.impl, 1) < KERNEL_VERSIONS.get(r.impl, 1)})

    def refresh(self) -> list[str]:
        """Drop the rows of stale kernels, and the whole networks timed with their types (calibration
        plans ran them), so that profiling measures them anew; return the stale kernels."""
        stale = self.stale()
        types = {r.type for r in self.rows.values() if r.impl in stale}
        self.rows = {k: r for k, r in self.rows.items() if r.impl not in stale}
        self.rest = {k: v for k, v in self.rest.items() if not types & set(v.get("grid", {}).get("types", []))}
        self.kernels = {**self.kernels, **KERNEL_VERSIONS}
        return stale

    def to_dict(self) -> dict[str, object]:
        rows = sorted(self.rows.values(), key=lambda r: (r.signature.key, r.type, r.rate, r.in_keep, r.out_keep))
        return {"schema": SCHEMA, "kind": "sparsesearch-latency-profile", "fingerprint": self.fingerprint,
                "timing": self.timing, "units": {"median_ms": "ms per call (whole batch)", "macs": "per sample"},
                "yardstick_ms": self.yardstick_ms, "steps": self.steps, "kernels": self.kernels, "rest": self.rest,
                "verdicts": self.verdicts(), "rows": [r.to_dict() for r in rows]}

    def _dense_ms(self) -> dict[str, float]:
        """The unpruned layer's latency per signature key."""
        return {r.signature.key: r.median_ms for r in self.rows.values() if r.type == "plain"
                and (r.in_keep, r.out_keep) == (r.signature.in_channels, r.signature.out_channels)}

    def unpaid(self) -> set[tuple[str, str]]:
        """(signature key, layer-local type) pairs that buy no time on this device: at their highest
        rate, all channels kept, they run no faster than the dense layer, or run the dense layer
        itself (no sparse kernel here). A lower rate keeps more weights and only costs more, so
        profiling times such a pair at that one rate, and the search withholds it (CSR kernels on
        a CPU are 0.4-0.7x the dense conv on tv:resnet18's 3x3 layers even at 90%)."""
        dense = self._dense_ms()
        top: dict[tuple[str, str], Row] = {}
        for r in self.rows.values():
            full = (r.in_keep, r.out_keep) == (r.signature.in_channels, r.signature.out_channels)
            pair = (r.signature.key, r.type)
            if full and r.type in {k.value for k in LAYER_LOCAL} and r.signature.key in dense and (
                    pair not in top or r.rate > top[pair].rate):
                top[pair] = r
        return {pair for pair, r in top.items() if r.impl == "dense-fallback" or r.median_ms >= dense[pair[0]]}

    def verdicts(self) -> dict[str, str]:
        """Per layer-local type, whether it pays on this device, from the rows with all channels kept:
        on how many layer shapes some rate runs at least `PAYS` times faster than the dense layer, and
        the best ratio (a row with half the inputs kept would credit the pattern with their removal).
        A type that never does is compression only here (CSR on a CPU); the search withholds it where
        the latency model says so (`search.Search._no_faster`). Written into the profile for people."""
        dense = self._dense_ms()
        out = {}
        for kind in sorted({r.type for r in self.rows.values()} & {k.value for k in LAYER_LOCAL}):
            rows = [r for r in self.rows.values() if r.type == kind and r.signature.key in dense  # all channels kept:
                    and (r.in_keep, r.out_keep) == (r.signature.in_channels, r.signature.out_channels)]  # the rate's own gain
            if not rows:
                continue
            if all(r.impl == "dense-fallback" for r in rows):
                out[kind] = "no sparse kernel on this device: compression only (it runs the dense layer)"
                continue
            ratio = {r.key: dense[r.signature.key] / r.median_ms for r in rows}
            best = max(rows, key=lambda r: ratio[r.key])
            shapes = {r.signature.key for r in rows}
            paying = {r.signature.key for r in rows if ratio[r.key] >= PAYS}
            at = f"best {ratio[best.key]:.2f}x: {best.impl} at rate {best.rate:g}"
            out[kind] = (f"{PAYS:g}x faster than the dense layer on {len(paying)} of {len(shapes)} layer shapes ({at})"
                         if paying else f"never {PAYS:g}x faster than the dense layer ({at}): compression only "
                         "on this device")
        return out

    def save(self, path: Path | None = None) -> Path:
        path = Path(path or self.path)
        write_json(path, self.to_dict())
        self.path = path
        return path

    @classmethod
    def load(cls, path: Path) -> Profile:
        raw = read_json(Path(path), "latency profile")
        if not isinstance(raw, dict) or raw.get("kind") != "sparsesearch-latency-profile":
            raise UserError(f"{path} is not a latency profile; write one with `sparsesearch profile`")
        if raw.get("schema", 0) > SCHEMA:
            raise UserError(f"{path} has profile schema {raw['schema']}; this sparsesearch reads {SCHEMA}: upgrade it")
        try:
            rows = [Row.from_dict(r) for r in raw["rows"]]
        except (KeyError, TypeError) as e:
            raise UserError(f"{path} has a malformed row ({e}); re-run `sparsesearch profile` to rewrite it") from e
        steps = raw.get("steps") or {}
        if not isinstance(steps, dict) or not all(isinstance(steps.get(k, 1), int) for k in ("out", "in")):
            raise UserError(f"{path} has malformed channel steps ({str(steps)[:60]}); re-run `sparsesearch profile`")
        kernels = raw.get("kernels") or {}
        if not isinstance(kernels, dict) or not all(isinstance(v, int) for v in kernels.values()):
            raise UserError(f"{path} has malformed kernel versions ({str(kernels)[:60]}); re-run `sparsesearch profile`")
        return cls(raw["fingerprint"], {r.key: r for r in rows}, raw.get("rest", {}), raw.get("timing", {}), Path(path),
                   raw.get("yardstick_ms"), steps, kernels)

    def predictor(self):  # noqa: ANN201 - a fitted predictor.LatencyModel
        """The latency model fitted on this table (cross-validated error in its `cv_error`)."""
        from .predictor import LatencyModel

        return LatencyModel().fit(self)

    def check(self, here: dict[str, object], allow_foreign: bool = False, target: bool = False) -> None:
        """Refuse a profile measured elsewhere (another device, threads, batch, dtype or torch), unless
        `allow_foreign`. A `target` profile, named on purpose as the device the plans will run on, may
        be another device's, but must predict the batch size and dtype asked for."""
        diff = [d for d in differences(self.fingerprint, here) if not target or d.split(":")[0] in SETTING]
        if diff and not allow_foreign:
            fix = "pass the --batch-size (and dtype) it was profiled with" if target else \
                "profile this device with `sparsesearch profile`, or pass --allow-foreign-profile"
            if all(d.startswith("layout:") for d in diff):  # the one field a flag changes
                fix = ("drop --channels-last, or profile that layout with `sparsesearch profile --channels-last`"
                       if here.get("layout") == "channels-last" else "pass --channels-last, the layout it was "
                       "measured in")
            raise UserError(f"profile {self.path} was measured on another setting ({'; '.join(diff)}); {fix}")


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:48]


def profile_name(fp: dict[str, object]) -> str:
    """`<device-slug>-b<batch>-<dtype>[-channels-last].json`, e.g. cpu-amd-epyc-t2-b1-float32.json."""
    if fp["device"] == "cuda":
        device = f"cuda-{slug(str(fp['device_name']))}"
    else:
        device = f"cpu-{slug(str(fp['device_name']))}-t{fp['threads']}"
    layout = fp.get("layout", BEFORE["layout"])
    return f"{device}-b{fp['batch_size']}-{fp['dtype']}{'' if layout == BEFORE['layout'] else '-' + layout}.json"


def find_profile(here: dict[str, object], root: Path | None = None, network: str | None = None) -> Path | None:
    """The profile under `root` (default: `profiles_dir()`, then the shipped ones) measured on this
    fingerprint (and, given a `model_key`, holding that network's rest), or None."""
    roots = [Path(root)] if root is not None else [profiles_dir(), SHIPPED_PROFILES]
    candidates = []
    for folder in roots:
        preferred = folder / profile_name(here)
        candidates += [preferred, *sorted(set(folder.glob("*.json")) - {preferred})]  # renamed files count
    for candidate in candidates:
        try:
            raw = read_json(candidate, "latency profile")
        except UserError:
            continue
        if isinstance(raw, dict) and raw.get("kind") == "sparsesearch-latency-profile" \
                and not differences(raw.get("fingerprint", {}), here) and (network is None or network in raw.get("rest", {})):
            return candidate
    return None


def load_profile(path: Path | None, device: torch.device, batch_size: int, dtype: str = "float32",
                 allow_foreign: bool = False, threads: int | None = None, target: bool = False,
                 layout: str = DEFAULT_LAYOUT) -> Profile:
    """The profile at `path` (or the one `find_profile` finds for this device), checked against it
    (`Profile.check`: a `target` profile may be another device's)."""
    here = fingerprint(device, batch_size, dtype, threads, layout)
    if path is None:
        path = find_profile(here)
        if path is None:
            raise UserError(f"no latency profile for this device under {profiles_dir()}/ ({profile_name(here)}); "
                            f"run `sparsesearch profile --device {device} --batch-size {batch_size} --dtype {dtype}"
                            f"{' --channels-last' if layout == 'channels-last' else ''}`")
    profile = Profile.load(path)
    profile.check(here, allow_foreign, target)
    return profile
