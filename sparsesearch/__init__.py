"""sparsesearch: hardware-aware AutoML for structured sparsity in conv nets (StructADMM)."""

from __future__ import annotations

from collections.abc import Iterable
from os import PathLike
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

__version__ = "0.1.0"


def load(path: str | PathLike[str], trust: Iterable[str] = ()) -> nn.Module:
    """An exported compacted model, rebuilt in eval mode without its plan (see sparsesearch.export).
    Classes come from torch, torchvision and sparsesearch, plus the packages you name in `trust`
    (your own model's package), never from the file. Imported on first use, so that
    `import sparsesearch` stays light."""
    from .export import load as load_export

    return load_export(path, trust)
