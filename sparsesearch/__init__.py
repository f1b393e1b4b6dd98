"""sparsesearch: hardware-aware AutoML for structured sparsity in conv nets (StructADMM)."""

from __future__ import annotations

from os import PathLike
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

__version__ = "0.1.0"


def load(path: str | PathLike[str]) -> nn.Module:
    """An exported compacted model, rebuilt in eval mode without its plan (see sparsesearch.export).
    Imported on first use, so that `import sparsesearch` stays light."""
    from .export import load as load_export

    return load_export(path)
