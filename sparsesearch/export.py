"""Export of a compacted model: a rebuildable save, TorchScript and ONNX.

`save` writes the model as data, not pickled code: a weights file (a dict of tensors, read back
with `torch.load(weights_only=True)`) and a JSON sidecar describing the module tree (each module's
class import path, its plain attributes, the names, shapes and dtypes of its parameters and
buffers, its children). `load` allocates each class without calling its `__init__`, restores the
attributes and tensors, and so rebuilds any module tree, compact kernels included, without the
plan that produced it. Classes are imported only from torch, torchvision, sparsesearch and the
packages the caller of `load` trusts by name, never from a package the file names, so a file
cannot make us import arbitrary code; functions only from torch's functional ops, and a stored
attribute never replaces a method.

Formats without sparse kernels get dense equivalents, always listed (`densified`) so that no
reader mistakes them for sparse: tensors in a sparse layout or tensor subclass (2:4
semi-structured) are stored dense everywhere, and ONNX has no CSR product, so CSR layers export as
the dense masked matmul (same outputs, no sparse speedup).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
import os
import pickle
import sys
import warnings
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from .errors import UserError, brief
from .files import read_json, save_with, sha256, torch_save, write_json
from .structure import Collected, build, describe, stored

if TYPE_CHECKING:
    from .compact import Compacted

SCHEMA = 1
KIND = "compacted"
TRUSTED = ("torch", "torchvision", "sparsesearch")
PROBE_TOLERANCE = 1e-6  # relative: the rebuilt model runs the same code on the same tensors
_INSTALL = "pip install 'sparsesearch[export]'"


# --- save and load --------------------------------------------------------------------------------


def _trusted(packages: Iterable[str]) -> tuple[str, ...]:
    """torch, torchvision, sparsesearch, and the caller's own packages (importable from the
    working directory, as models.create resolves user factories)."""
    packages = tuple(p.split(".")[0] for p in packages)
    if packages and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    return (*TRUSTED, *packages)


def _user_package(meta: dict[str, Any]) -> tuple[str, ...]:
    """The package of the `package.module:factory` a model being saved was made by, if any."""
    model = str(meta.get("model", ""))
    return (model.split(":")[0],) if ":" in model and not model.startswith(("tv:", "timm:")) else ()


def sidecar(path: Path) -> Path:
    return Path(path).with_suffix(".json")


def save(path: Path, model: nn.Module, meta: dict[str, Any], example_input: Tensor | None = None) -> list[str]:
    """Write `path` (tensors) and its JSON sidecar (structure), each atomically; the sidecar holds the
    weights' SHA-256, so a pair from two different saves is refused. With `example_input`, its output
    is stored too and `load` checks the rebuilt model reproduces it (catches a changed kernel).
    Returns the tensors stored dense although the model held them sparse."""
    from .runtime import versions

    path, trusted = Path(path), _trusted(_user_package(meta))
    collected = Collected()
    root = describe(model, "", trusted, collected)
    weights: dict[str, Any] = {"tensors": collected.tensors}
    if example_input is not None:
        probe = example_input[:2]
        with torch.inference_mode():
            weights["probe"] = {"input": probe.detach().cpu(), "output": model.eval()(probe).detach().cpu()}
    torch_save(path, weights)
    write_json(sidecar(path), {"schema": SCHEMA, **meta, "kind": KIND, "weights": path.name,
                               "weights_sha256": sha256(path), "versions": versions(),
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
    if sha256(weights) != description.get("weights_sha256"):
        raise UserError(f"{weights} is not the file {sidecar(path).name} describes (truncated, corrupt or "
                        "from another export); export the model again")
    try:
        with warnings.catch_warnings():  # torch warns about foreign pickles before failing on them
            warnings.simplefilter("ignore", UserWarning)
            stored = torch.load(weights, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, zipfile.BadZipFile) as e:
        raise UserError(f"{weights} is not a readable weights-only file ({brief(e)}); "
                        "export the model again") from e
    return description, stored


def load(path: Path | str, trust: Iterable[str] = ()) -> nn.Module:
    """The exported model, rebuilt on the CPU in eval mode from `path` (the weights file, its .json
    sidecar, or the folder `write_all` filled); no plan or original model needed. Its classes may
    come from torch, torchvision and sparsesearch, and from the packages in `trust` (a model built
    by your `mypkg.nets:build`: trust=["mypkg"]); the file itself widens nothing."""
    try:  # anything but a UserError here means content that no save() wrote
        description, stored = _read(Path(path))
        model = build(description["root"], stored["tensors"], _trusted(trust), {}).eval()
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        raise UserError(f"{path} is corrupt: its description does not fit its tensors "
                        f"({brief(e)}); export the model again") from e
    if "probe" in stored:
        _check_probe(model, stored["probe"], f"{path} (exported with {description.get('versions')})")
    return model


def _check_probe(model: nn.Module, probe: dict[str, Tensor], what: str) -> None:
    """The rebuilt model reproduces the output saved with it: the classes' code has not changed."""
    hint = "install the versions it was exported with"
    if not all(isinstance(probe.get(k), Tensor) for k in ("input", "output")):
        raise UserError(f"{what} is corrupt: its probe is not a pair of tensors; export the model again")
    try:
        with torch.inference_mode():
            got, expected = model(probe["input"]), probe["output"]
    except (RuntimeError, KeyError, TypeError) as e:
        raise UserError(f"{what} rebuilt does not run on its saved input ({brief(e)}); {hint}") from e
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
            if tensor is not None and stored(tensor)[1]:
                dense = tensor.detach().to_dense()
                setattr(module, name, nn.Parameter(dense, False) if name in module._parameters else dense)
                densified.append(f"{module_name}.{name}".lstrip("."))
        if csr and isinstance(module, _CSR):
            matrix = torch.sparse_csr_tensor(module.crow_indices, module.col_indices, module.values, module.shape,
                                             check_invariants=True)
            model.set_submodule(module_name, _DenseMatrix(matrix.to_dense()))
            densified.append(module_name.rpartition(".")[0])
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
            raise UserError(f"cannot trace the model to TorchScript ({brief(e)})") from e
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
        raise UserError(f"cannot export the model to ONNX ({brief(e)})") from e
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
