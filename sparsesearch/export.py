"""Export of a compacted model: a rebuildable save, TorchScript and ONNX.

`save` writes the model as data, not pickled code: a weights file (a dict of tensors, read back
with `torch.load(weights_only=True)`) and a JSON sidecar describing the module tree (each module's
class import path, its plain attributes, the names, shapes and dtypes of its parameters and
buffers, its children). `load` allocates each class without calling its `__init__`, restores the
attributes and tensors, and so rebuilds any module tree, compact kernels included, without the
plan that produced it. Classes are imported only from torch, torchvision, sparsesearch and the
package of the user factory named in the sidecar's `model`, so a file cannot make us import
arbitrary code.

Formats without sparse kernels get dense equivalents, always listed (`densified`) so that no
reader mistakes them for sparse: tensors in a sparse layout or tensor subclass (2:4
semi-structured) are stored dense everywhere, and ONNX has no CSR product, so CSR layers export as
the dense masked matmul (same outputs, no sparse speedup).
"""

from __future__ import annotations

import copy
import dataclasses
import enum
import hashlib
import importlib
import importlib.util
import json
import logging
import os
import pickle
import sys
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from .errors import UserError
from .files import read_json, save_with, torch_save, write_json

if TYPE_CHECKING:
    from .compact import Compacted

SCHEMA = 1
KIND = "compacted"
TRUSTED = ("torch", "torchvision", "sparsesearch")
PROBE_TOLERANCE = 1e-6  # relative: the rebuilt model runs the same code on the same tensors
_BARE = frozenset(nn.Module().__dict__)  # what nn.Module.__init__ sets: not the module's own state
_INSTALL = "pip install 'sparsesearch[export]'"


# --- the module tree as JSON ----------------------------------------------------------------------


def _path_of(obj: Any) -> str:
    return f"{obj.__module__}:{obj.__qualname__}"


def _import(path: str, trusted: tuple[str, ...]) -> Any:
    """The class or function at `module:qualname`, imported only from a trusted package."""
    module_name, _, qualname = path.partition(":")
    if module_name.split(".")[0] not in trusted:
        raise UserError(f"{path} is outside the packages an exported model may use ({', '.join(trusted)}); "
                        "export models built from torch, torchvision, sparsesearch or a package.module:factory")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as e:
        raise UserError(f"cannot import {path} ({e}); run from the directory that contains the model's "
                        "package, with the versions it was exported with") from e
    return obj


def _importable(obj: Any, trusted: tuple[str, ...], where: str) -> str:
    """obj's import path, checked now so that we never write a file that cannot be loaded."""
    path = _path_of(obj)
    if "<locals>" in path or obj.__module__ == "__main__" or _import(path, trusted) is not obj:
        raise UserError(f"{where}: {path} cannot be imported by name; define it at the top level of a module")
    return path


def _encode(value: Any, trusted: tuple[str, ...], where: str) -> Any:
    """A module attribute as JSON; only values whose meaning is their data."""
    rec = lambda v: _encode(v, trusted, where)  # noqa: E731
    if value is None or type(value) in (bool, int, float, str):
        return value
    if type(value) is list:
        return [rec(v) for v in value]
    if type(value) is tuple:
        return {"tuple": [rec(v) for v in value]}
    if type(value) is torch.Size:
        return {"size": list(value)}
    if type(value) is dict:
        return {"dict": [[rec(k), rec(v)] for k, v in value.items()]}
    if type(value) is slice:
        return {"slice": [rec(value.start), rec(value.stop), rec(value.step)]}
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).removeprefix("torch.")}
    if isinstance(value, enum.Enum):
        return {"enum": _importable(type(value), trusted, where), "value": rec(value.value)}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {"dataclass": _importable(type(value), trusted, where),
                "fields": {f.name: rec(getattr(value, f.name)) for f in dataclasses.fields(value)}}
    if isinstance(value, type) or callable(value) and hasattr(value, "__qualname__"):
        return {"ref": _importable(value, trusted, where)}  # e.g. torchvision's ResNet._norm_layer
    raise UserError(f"{where} is a {type(value).__name__}, which an export cannot describe as data; "
                    "make it a buffer, or a plain int/float/str/tuple/dataclass")


def _decode(value: Any, trusted: tuple[str, ...]) -> Any:
    rec = lambda v: _decode(v, trusted)  # noqa: E731
    if not isinstance(value, (list, dict)):
        return value
    if isinstance(value, list):
        return [rec(v) for v in value]
    tag, data = next(iter(value.items()))
    if tag == "tuple":
        return tuple(rec(v) for v in data)
    if tag == "size":
        return torch.Size(data)
    if tag == "dict":
        return {rec(k): rec(v) for k, v in data}
    if tag == "slice":
        return slice(*(rec(v) for v in data))
    if tag == "dtype":
        dtype = getattr(torch, data)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"not a dtype: {data}")
        return dtype
    if tag == "ref":
        return _import(data, trusted)
    cls = _import(data, trusted)
    if tag == "enum" and issubclass(cls, enum.Enum):
        return cls(rec(value["value"]))
    if tag == "dataclass" and dataclasses.is_dataclass(cls):
        obj = object.__new__(cls)  # as the module itself: restore the data, run no constructor
        for name, v in value["fields"].items():
            object.__setattr__(obj, name, rec(v))
        return obj
    raise ValueError(f"unknown value tag {tag!r}")


def _stored(tensor: Tensor) -> tuple[Tensor, bool]:
    """The tensor as the weights file holds it: on the CPU, dense; and whether it was densified."""
    sparse = tensor.layout != torch.strided or type(tensor.data) is not Tensor
    tensor = tensor.detach()
    return (tensor.to_dense() if sparse else tensor).cpu(), sparse


@dataclass
class _Collected:
    tensors: dict[str, Tensor] = field(default_factory=dict)
    densified: list[str] = field(default_factory=list)
    paths: dict[int, str] = field(default_factory=dict)  # id of a module or tensor -> first name


def _describe(module: nn.Module, prefix: str, trusted: tuple[str, ...], out: _Collected) -> dict[str, Any]:
    """One module's node; a module or tensor met twice (tied weights) refers to its first name."""
    if id(module) in out.paths:
        return {"same_as": out.paths[id(module)]}
    out.paths[id(module)] = prefix
    where = prefix or "the model"
    hooks = [k for k in _BARE if "hook" in k and getattr(module, k)]
    if hooks:
        raise UserError(f"{where} carries hooks ({', '.join(hooks)}), which are code, not data; remove them "
                        "(e.g. torch.nn.utils.parametrize.remove_parametrizations) before exporting")

    def tensors(items: dict[str, Tensor | None]) -> dict[str, Any]:
        specs: dict[str, Any] = {}
        for name, tensor in items.items():
            key = f"{prefix}.{name}" if prefix else name
            if tensor is None or id(tensor) in out.paths:
                specs[name] = tensor if tensor is None else {"same_as": out.paths[id(tensor)]}
                continue
            out.paths[id(tensor)] = key
            out.tensors[key], sparse = _stored(tensor)
            if sparse:
                out.densified.append(key)
            specs[name] = {"shape": list(tensor.shape), "dtype": str(tensor.dtype).removeprefix("torch."),
                           "requires_grad": tensor.requires_grad}
        return specs

    attributes = {k: v for k, v in module.__dict__.items() if k not in _BARE}
    return {
        "class": _importable(type(module), trusted, where),
        "attributes": {k: _encode(v, trusted, f"attribute {k} of {where}") for k, v in attributes.items()},
        "parameters": tensors(module._parameters),
        "buffers": tensors(module._buffers),
        "non_persistent": sorted(module._non_persistent_buffers_set),
        "children": {name: None if child is None else _describe(child, f"{prefix}.{name}" if prefix else name,
                                                                 trusted, out)
                     for name, child in module._modules.items()},
    }


def _build(node: dict[str, Any], tensors: dict[str, Tensor], trusted: tuple[str, ...],
           built: dict[str, Any], prefix: str = "") -> nn.Module:
    """The module a node describes, allocated without its __init__ and filled from the file."""
    if "same_as" in node:
        return built[node["same_as"]]
    cls = _import(node["class"], trusted)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ValueError(f"{node['class']} is not a torch module")
    module = cls.__new__(cls)
    nn.Module.__init__(module)
    built[prefix] = module
    for name, value in node["attributes"].items():
        object.__setattr__(module, name, _decode(value, trusted))

    def tensor(name: str, spec: dict[str, Any] | None) -> Tensor | None:
        if spec is None or "same_as" in spec:
            return spec if spec is None else built[spec["same_as"]]
        key = f"{prefix}.{name}" if prefix else name
        value = tensors[key]
        if list(value.shape) != spec["shape"] or str(value.dtype).removeprefix("torch.") != spec["dtype"]:
            raise ValueError(f"{key} is {tuple(value.shape)} {value.dtype}, described as {spec}")
        built[key] = value
        return value

    for name, spec in node["parameters"].items():
        value = tensor(name, spec)
        if value is not None and not isinstance(value, nn.Parameter):
            value = built[f"{prefix}.{name}" if prefix else name] = nn.Parameter(value, spec["requires_grad"])
        module.register_parameter(name, value)
    for name, spec in node["buffers"].items():
        module.register_buffer(name, tensor(name, spec), persistent=name not in node["non_persistent"])
    for name, child in node["children"].items():
        module.add_module(name, None if child is None else
                          _build(child, tensors, trusted, built, f"{prefix}.{name}" if prefix else name))
    return module


# --- save and load --------------------------------------------------------------------------------


def _trusted(meta: dict[str, Any]) -> tuple[str, ...]:
    """torch, torchvision, sparsesearch, and the package of a `package.module:factory` model."""
    model = str(meta.get("model", ""))
    if ":" in model and not model.startswith("tv:"):
        if os.getcwd() not in sys.path:  # as models.create resolves user factories
            sys.path.insert(0, os.getcwd())
        return (*TRUSTED, model.split(":")[0].split(".")[0])
    return TRUSTED


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sidecar(path: Path) -> Path:
    return Path(path).with_suffix(".json")


def save(path: Path, model: nn.Module, meta: dict[str, Any], example_input: Tensor | None = None) -> list[str]:
    """Write `path` (tensors) and its JSON sidecar (structure), each atomically; the sidecar holds the
    weights' SHA-256, so a pair from two different saves is refused. With `example_input`, its output
    is stored too and `load` checks the rebuilt model reproduces it (catches a changed kernel).
    Returns the tensors stored dense although the model held them sparse."""
    from .runtime import versions

    path, trusted = Path(path), _trusted(meta)
    collected = _Collected()
    root = _describe(model, "", trusted, collected)
    weights: dict[str, Any] = {"tensors": collected.tensors}
    if example_input is not None:
        probe = example_input[:2]
        with torch.inference_mode():
            weights["probe"] = {"input": probe.detach().cpu(), "output": model.eval()(probe).detach().cpu()}
    torch_save(path, weights)
    write_json(sidecar(path), {"schema": SCHEMA, **meta, "kind": KIND, "weights": path.name,
                               "weights_sha256": _sha256(path), "versions": versions(),
                               "densified": collected.densified, "root": root})
    return collected.densified


def _read(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Sidecar and weights of an export, or a UserError saying which file is wrong and why."""
    path = Path(path) / "model.pt" if Path(path).is_dir() else Path(path).with_suffix(".pt")
    description = read_json(sidecar(path), "exported model description")
    if not isinstance(description, dict) or description.get("kind") != KIND:
        raise UserError(f"{sidecar(path)} does not describe an exported compacted model; "
                        "export one with sparsesearch.export.save")
    if description.get("schema", 0) > SCHEMA:
        raise UserError(f"{sidecar(path)} has schema {description['schema']}; this sparsesearch reads up to "
                        f"{SCHEMA}: upgrade sparsesearch")
    weights = path.with_name(Path(str(description.get("weights", path.name))).name)  # never outside the folder
    if not weights.is_file():
        raise UserError(f"weights file not found: {weights}; keep it beside {sidecar(path).name}")
    if _sha256(weights) != description.get("weights_sha256"):
        raise UserError(f"{weights} is not the file {sidecar(path).name} describes (truncated, corrupt or "
                        "from another export); export the model again")
    try:
        with warnings.catch_warnings():  # torch warns about foreign pickles before failing on them
            warnings.simplefilter("ignore", UserWarning)
            stored = torch.load(weights, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, zipfile.BadZipFile) as e:
        raise UserError(f"{weights} is not a readable weights-only file ({str(e).splitlines()[0]}); "
                        "export the model again") from e
    return description, stored


def load(path: Path | str) -> nn.Module:
    """The exported model, rebuilt on the CPU in eval mode from `path` (the weights file, its .json
    sidecar, or the folder `write_all` filled); no plan or original model needed."""
    try:  # anything but a UserError here means content that no save() wrote
        description, stored = _read(Path(path))
        model = _build(description["root"], stored["tensors"], _trusted(description), {}).eval()
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        raise UserError(f"{path} is corrupt: its description does not fit its tensors "
                        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); export the model again") from e
    if "probe" in stored:
        _check_probe(model, stored["probe"], f"{path} (exported with {description.get('versions')})")
    return model


def _check_probe(model: nn.Module, probe: dict[str, Tensor], what: str) -> None:
    """The rebuilt model reproduces the output saved with it: the classes' code has not changed."""
    hint = "install the versions it was exported with"
    try:
        with torch.inference_mode():
            got, expected = model(probe["input"]), probe["output"]
    except (RuntimeError, KeyError, TypeError) as e:
        raise UserError(f"{what} rebuilt does not run on its saved input ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''}); {hint}") from e
    error = ((got - expected).abs().max() / expected.abs().max().clamp_min(1e-12)).item()
    if not error <= PROBE_TOLERANCE:  # NaN too
        raise UserError(f"{what} rebuilt does not reproduce its saved output (relative error {error:.2g}); {hint}")


# --- TorchScript and ONNX -------------------------------------------------------------------------


class _DenseMatrix(nn.Module):
    """A CSR matrix's dense form, with the same `mm`: for formats that have no sparse product."""

    def __init__(self, matrix: Tensor) -> None:
        super().__init__()
        self.register_buffer("matrix", matrix)

    def mm(self, dense: Tensor) -> Tensor:
        return self.matrix @ dense


def _dense_copy(model: nn.Module, csr: bool) -> tuple[nn.Module, list[str]]:
    """An eval copy whose sparse tensors are dense and, with csr=True, whose CSR matrices multiply
    densely; and the names of what changed."""
    from .kernels import _CSR

    model = copy.deepcopy(model).eval()
    densified = []
    for module_name, module in list(model.named_modules()):
        for name, tensor in list(module._parameters.items()) + list(module._buffers.items()):
            if tensor is not None and _stored(tensor)[1]:
                dense = tensor.detach().to_dense()
                setattr(module, name, nn.Parameter(dense, False) if name in module._parameters else dense)
                densified.append(f"{module_name}.{name}".lstrip("."))
        if csr and isinstance(module, _CSR):
            matrix = torch.sparse_csr_tensor(module.crow_indices, module.col_indices, module.values, module.shape,
                                             check_invariants=True)
            parent, _, child = module_name.rpartition(".")
            setattr(model.get_submodule(parent), child, _DenseMatrix(matrix.to_dense()))
            densified.append(parent)
    return model, densified


def to_torchscript(model: nn.Module, example_input: Tensor, path: Path,
                   extra: dict[str, Any] | None = None) -> list[str]:
    """Trace the model to a TorchScript file (`torch.jit.load` runs it without sparsesearch); `extra`
    is stored as `sparsesearch.json` in its extra files. CSR layers keep their sparse kernel, whose
    matrix the trace holds as a constant. Returns what was densified.

    torch.jit is deprecated upstream in favour of torch.export but still the format most C++ and
    mobile runtimes read; its deprecation warnings are ours to ignore, not the user's.
    """
    traced_model, densified = _dense_copy(model, csr=False)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.\w+` is deprecated", category=FutureWarning)
        warnings.filterwarnings("ignore", message="torch.sparse_csr_tensor results are registered as constants")
        try:
            traced = torch.jit.trace(traced_model, example_input)
        except (RuntimeError, TypeError, ValueError) as e:
            raise UserError(f"cannot trace the model to TorchScript ({type(e).__name__}: "
                            f"{str(e).splitlines()[0]})") from e
        files = {"sparsesearch.json": json.dumps({**(extra or {}), "densified": densified})}
        save_with(Path(path), lambda tmp: torch.jit.save(traced, str(tmp), _extra_files=files))
    return densified


def onnx_missing() -> str | None:
    """Why ONNX export cannot run here, or None: it needs onnx and onnxscript (the `export` extra)."""
    missing = [name for name in ("onnx", "onnxscript") if importlib.util.find_spec(name) is None]
    return f"{' and '.join(missing)} not installed ({_INSTALL})" if missing else None


def to_onnx(model: nn.Module, example_input: Tensor, path: Path, extra: dict[str, Any] | None = None) -> list[str]:
    """Export to ONNX through torch.export (the exporter torch maintains), batch size dynamic, checked
    with onnx's checker; `extra` goes into the model's metadata_props. CSR layers become dense
    matmuls (ONNX has no sparse product). Returns what was densified."""
    reason = onnx_missing()
    if reason:
        raise UserError(f"cannot export to ONNX: {reason}")
    import onnx

    exported, densified = _dense_copy(model, csr=True)
    # torch.export specializes a batch of 1, so the example needs 2 samples for a dynamic batch
    x = example_input if example_input.shape[0] > 1 else example_input.expand(2, *example_input.shape[1:])
    onnxscript_log = logging.getLogger("onnxscript")  # a library does not print: its notes are harmless
    level = onnxscript_log.level
    onnxscript_log.setLevel(logging.ERROR)
    try:
        program = torch.onnx.export(exported, (x,), dynamo=True, verbose=False, input_names=["input"],
                                    output_names=["output"], dynamic_shapes=({0: torch.export.Dim("batch")},))
        proto = program.model_proto
        onnx.helper.set_model_props(proto, {"sparsesearch": json.dumps({**(extra or {}), "densified": densified})})
        onnx.checker.check_model(proto, full_check=True)
    except Exception as e:  # noqa: BLE001 - the exporter raises a zoo of types; all mean "not exportable"
        raise UserError(f"cannot export the model to ONNX ({type(e).__name__}: {str(e).strip().splitlines()[0]})") from e
    finally:
        onnxscript_log.setLevel(level)
    save_with(Path(path), lambda tmp: onnx.save_model(proto, str(tmp)))
    return densified


# --- everything at once ---------------------------------------------------------------------------


@dataclass
class Exported:
    """What `write_all` wrote, what it skipped and why, and what each format holds dense."""

    files: dict[str, Path]
    skipped: dict[str, str]
    densified: dict[str, list[str]]


def write_all(out_dir: Path, compacted: Compacted, example_input: Tensor, meta: dict[str, Any]) -> Exported:
    """Every format into `out_dir`: model.pt + model.json (for `sparsesearch.load`),
    model.torchscript.pt and model.onnx (skipped, with the reason, when onnx is not installed)."""
    out_dir = Path(out_dir)
    meta = {**meta, "input_shape": list(example_input.shape[1:]), "impl": compacted.impl, "macs": compacted.macs}
    extra = {k: meta[k] for k in ("model", "dataset", "input_shape", "impl") if k in meta}
    writers: dict[str, tuple[Path, Callable[[Path], list[str]]]] = {
        "state": (out_dir / "model.pt", lambda p: save(p, compacted.model, meta, example_input)),
        "torchscript": (out_dir / "model.torchscript.pt",
                        lambda p: to_torchscript(compacted.model, example_input, p, extra)),
        "onnx": (out_dir / "model.onnx", lambda p: to_onnx(compacted.model, example_input, p, extra)),
    }
    done = Exported({}, {}, {})
    if reason := onnx_missing():
        done.skipped["onnx"] = reason
        del writers["onnx"]
    for name, (path, write) in writers.items():
        done.densified[name] = write(path)
        done.files[name] = path
    return done
