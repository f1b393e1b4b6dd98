"""Checkpoints: a weights file (state dict, loaded with weights_only=True) and a JSON sidecar that
says what produced it, so any later step can check it is combining the right model and data."""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import UserError, brief
from .files import read_json, torch_save, write_json
from .models import recorded

SCHEMA = 1


def sidecar(path: Path) -> Path:
    return Path(path).with_suffix(".json")


def save(path: Path, model: nn.Module, meta: dict[str, Any]) -> None:
    """Write weights then sidecar, each atomically; the sidecar names its weights file."""
    path = Path(path)
    torch_save(path, model.state_dict())
    write_json(sidecar(path), {"schema": SCHEMA, **meta, "weights": path.name})


def read_meta(path: Path) -> dict[str, Any]:
    """The sidecar of checkpoint `path` (UserError if missing, corrupt or from a newer sparsesearch)."""
    meta = read_json(sidecar(path), "checkpoint sidecar")
    if not isinstance(meta, dict) or meta.get("schema", 0) > SCHEMA:
        raise UserError(f"{sidecar(path)} has schema {meta.get('schema') if isinstance(meta, dict) else '?'}; "
                        f"this sparsesearch reads up to {SCHEMA}: upgrade sparsesearch")
    return meta


def _must_exist(path: Path) -> Path:
    if not Path(path).is_file():
        raise UserError(f"checkpoint not found: {path}; check the path or train one with `sparsesearch train`")
    return Path(path)


def trained_with(path: Path, model: str | None, dataset: str | None) -> tuple[str, str]:
    """The model and dataset of checkpoint `path`: those given, else those its sidecar records.
    A flag that contradicts the sidecar is refused rather than silently loaded into another model."""
    _must_exist(path)
    try:
        meta = read_meta(path)
    except UserError:
        if model is None or dataset is None:
            raise UserError(f"{path} has no readable sidecar ({sidecar(path).name}) saying what it was trained "
                            "with; pass --model and --dataset") from None
        return model, dataset
    found = {"model": model, "dataset": dataset}
    for key, given in found.items():
        kept = meta.get(key)
        if given is not None and kept is not None and given != kept:
            raise UserError(f"--{key} {given} contradicts {sidecar(path).name}, which records {key} {kept}; "
                            f"drop --{key} or pass the checkpoint trained with it")
        found[key] = given if given is not None else kept
    if None in found.values():
        raise UserError(f"{sidecar(path)} does not record the model and dataset; pass --model and --dataset")
    return recorded(found["model"], model, str(sidecar(path))), found["dataset"]


def recorded_side(path: Path, given: int | None) -> int | None:
    """The input side checkpoint `path` was trained at (its sidecar's `input_shape`), else `given`.
    Weights trained at one side load at any other (adaptive pooling), so a side that contradicts
    the record is refused: it would profile and search a model the user does not run."""
    try:
        shape = read_meta(path).get("input_shape")
    except UserError:
        return given
    if not shape:
        return given
    side = int(shape[-1])
    if given is not None and given != side:
        raise UserError(f"--image-size {given} contradicts {sidecar(path).name}, which records {side} px inputs; "
                        f"drop --image-size, or pass a checkpoint trained at {given} px")
    return side


def load_state(path: Path) -> dict[str, torch.Tensor]:
    """Read a state dict without executing pickled code; accepts {'state_dict': ...} wrappers too."""
    path = _must_exist(path)
    try:
        with warnings.catch_warnings():  # torch warns about foreign pickles before failing on them
            warnings.simplefilter("ignore", UserWarning)
            state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e:
        raise UserError(f"{path} is not a readable weights-only torch checkpoint ({brief(e)}); "
                        "save it with torch.save(model.state_dict(), path)") from e
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path} does not hold a state dict of tensors; save model.state_dict()")
    return state


def load_weights(model: nn.Module, path: Path, model_name: str) -> None:
    """Load `path` into `model`, explaining a mismatch in terms of keys and shapes rather than a traceback."""
    state = load_state(path)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    extra = [k for k in state if k not in own]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
             if k in state and state[k].shape != v.shape]
    if missing or extra or wrong:
        problems = [f"{len(items)} {label} (e.g. {items[0]})"
                    for label, items in (("missing keys", missing), ("unexpected keys", extra),
                                         ("shape mismatches, checkpoint vs model", wrong)) if items]
        trained = _trained_with(path)
        raise UserError(f"checkpoint {path} does not fit model '{model_name}': {'; '.join(problems)}; "
                        f"pass the --model and --dataset it was trained with{trained}")
    model.load_state_dict(state)


def _trained_with(path: Path) -> str:
    try:
        meta = read_meta(path)
    except UserError:
        return ""
    return f" (its sidecar says --model {meta.get('model')} --dataset {meta.get('dataset')})"
