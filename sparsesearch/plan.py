"""A sparsity plan: which layers get which sparsity type at which rate, saved as JSON or TOML.

Plans are validated once, against the model they will prune, so every later stage can trust them.
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError, unknown
from .files import save_with
from .layers import Layer
from .sparsity import REMOVED, SparsityType, aligned_keep, keep_count, nm_keep

SCHEMA = 1
ALIGNED = {SparsityType.FILTER: "out", SparsityType.CHANNEL: "in"}  # the side each type removes channels from


@dataclass(frozen=True)
class LayerSparsity:
    type: SparsityType
    rate: float  # fraction of the type's groups removed, in [0, 1)


@dataclass
class Plan:
    layers: dict[str, LayerSparsity]

    @classmethod
    def uniform(cls, layers: Iterable[Layer], kind: SparsityType, rate: float) -> Plan:
        """`kind` at `rate` on every layer it applies to (never filter on the classifier)."""
        return cls({layer.name: LayerSparsity(kind, rate) for layer in layers if kind in layer.types})

    def aligned(self, layers: Iterable[Layer], steps: dict[str, object]) -> Plan:
        """This plan with each filter (or channel) count raised to a multiple of the device's channel
        step on that side (`steps`, as `profiler.steps` records it; `sparsity.aligned_keep`), as the
        search draws plans and the profile times them; a layer left whole drops out."""
        by_name = {layer.name: layer for layer in layers}
        specs = {}
        for name, spec in self.layers.items():
            layer, side = by_name[name], ALIGNED.get(spec.type)
            if side is not None and not (side == "in" and layer.groups != 1):  # a group's filters align alike
                n = layer.weight_shape[0 if side == "out" else 1]
                kept = aligned_keep(n, spec.rate, int(steps.get(side, 1)))
                if kept != keep_count(n, spec.rate):  # the rate as drawn where it already keeps whole steps
                    spec = LayerSparsity(spec.type, (n - kept) / n)
            if spec.rate > 0:
                specs[name] = spec
        return Plan(specs)

    @classmethod
    def parse(cls, text: str, layers: list[Layer], couplings: list[list[str]] = ()) -> Plan:
        """A plan file path, or the shorthand TYPE=RATE for a uniform plan (e.g. filter=0.5)."""
        kind, sep, rate = text.partition("=")
        if sep and not Path(text).exists():
            plan = cls.uniform(layers, _kind(kind.strip(), "--plan"), _rate(rate, "--plan"))
        else:
            plan = cls.load(Path(text))
        plan.validate(layers, couplings)
        return plan

    # --- validation -------------------------------------------------------------------------------

    def validate(self, layers: list[Layer], couplings: list[list[str]] = ()) -> None:
        """Refuse unknown layers, rates outside [0, 1) (filter: [0, 1]), types the layer cannot take, and filter
        pruning that differs within a group of layers whose output channels are coupled."""
        by_name = {layer.name: layer for layer in layers}
        for name, spec in self.layers.items():
            if name not in by_name:
                raise unknown("layer", name, by_name, f"prunable layers: {', '.join(by_name)}")
            if not (0 <= spec.rate < 1 or spec.rate == REMOVED and spec.type == SparsityType.FILTER):
                raise UserError(f"layer '{name}': rate {spec.rate} outside [0, 1) (the fraction of groups removed; "
                                f"filter also takes {REMOVED:g}, which removes the layer: its residual branch, or in a "
                                "plain chain all but its identity path)")
            layer = by_name[name]
            if spec.type not in layer.types:
                why = " (it is the classifier: its rows are the classes)" if layer.is_output else ""
                raise UserError(f"layer '{name}' cannot take {spec.type.value} sparsity{why}; "
                                f"it accepts {', '.join(t.value for t in layer.types)}")
            if spec.type == SparsityType.NM:
                try:
                    nm_keep(spec.rate)
                except ValueError as e:
                    raise UserError(f"layer '{name}': {e}") from e
        if not self.layers:
            raise UserError("the plan prunes no layer; name at least one prunable layer")
        for group in couplings:
            specs = {n: self.layers.get(n) for n in group}
            filtered = [n for n, s in specs.items() if s is not None and s.type == SparsityType.FILTER]
            if filtered and len(set(specs.values())) > 1:
                raise UserError(
                    f"layers {', '.join(group)} share their output channels (a residual addition, a depthwise "
                    f"conv, an SE gate, or a concatenation feeding one), so filter pruning applies to the group: "
                    f"give all of them the same filter rate, or prune {', '.join(filtered)} with another type")

    # --- files ------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, object]:
        return {"schema": SCHEMA,
                "layers": {n: {"type": s.type.value, "rate": s.rate} for n, s in self.layers.items()}}

    @classmethod
    def from_dict(cls, raw: object, source: str) -> Plan:
        if not isinstance(raw, dict) or not isinstance(raw.get("layers"), dict):
            raise UserError(f"{source} is not a sparsity plan: expected a 'layers' table of "
                            "{name: {type, rate}}; see `sparsesearch layers` for names")
        if raw.get("schema", SCHEMA) > SCHEMA:
            raise UserError(f"{source} has plan schema {raw['schema']}; this sparsesearch reads {SCHEMA}: upgrade it")
        layers = {}
        for name, spec in raw["layers"].items():
            if not isinstance(spec, dict) or "type" not in spec or "rate" not in spec:
                raise UserError(f"{source}: layer '{name}' needs a type and a rate, e.g. {{type = \"filter\", rate = 0.5}}")
            layers[name] = LayerSparsity(_kind(spec["type"], f"{source}: layer '{name}'"),
                                         _rate(spec["rate"], f"{source}: layer '{name}'"))
        return cls(layers)

    def save(self, path: Path) -> None:
        """JSON, or TOML when the path ends in .toml; atomic either way."""
        text = _to_toml(self.to_dict()) if path.suffix == ".toml" else json.dumps(self.to_dict(), indent=2) + "\n"
        save_with(path, lambda tmp: tmp.write_text(text))

    @classmethod
    def load(cls, path: Path) -> Plan:
        if not path.is_file():
            raise UserError(f"plan not found: {path}; pass a .json/.toml plan or TYPE=RATE (e.g. filter=0.5)")
        try:
            raw = tomllib.loads(path.read_text()) if path.suffix == ".toml" else json.loads(path.read_text())
        except (json.JSONDecodeError, tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"plan {path} cannot be parsed ({e}); fix the file") from e
        if isinstance(raw, dict) and type(raw.get("schema")) is not int:
            raise UserError(f"plan {path} has no schema; add schema = {SCHEMA} (the format version) at its top")
        return cls.from_dict(raw, str(path))


def _kind(value: object, where: str) -> SparsityType:
    try:
        return SparsityType(value)
    except ValueError:
        raise unknown("sparsity type", str(value), [t.value for t in SparsityType], f"in {where}") from None


def _rate(value: object, where: str) -> float:
    try:
        if isinstance(value, bool):  # float(True) is 1.0: a typo, not a rate
            raise TypeError
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise UserError(f"{where}: rate '{value}' is not a number in [0, 1)") from None


def _to_toml(plan: dict[str, object]) -> str:
    lines = [f"schema = {plan['schema']}", ""]
    for name, spec in plan["layers"].items():  # type: ignore[union-attr]
        lines += [f"[layers.{json.dumps(name)}]", f"type = {json.dumps(spec['type'])}", f"rate = {spec['rate']}", ""]
    return "\n".join(lines)
