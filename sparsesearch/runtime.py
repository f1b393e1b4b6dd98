"""Where code runs (device, threads) and what it ran with (versions), recorded beside every result."""

from __future__ import annotations

import os
import platform
import sys

import torch
from torch import nn

from .errors import UserError

# memory layouts a network can run in; channels-last is oneDNN's own, often faster for convs on a CPU
LAYOUTS = {"contiguous": torch.contiguous_format, "channels-last": torch.channels_last}
DEFAULT_LAYOUT = "contiguous"  # torch's own, and what every file written before layouts were recorded ran in


def layout_of(channels_last: bool) -> str:
    """The layout a `--channels-last` flag (or a library call's `channels_last`) asks for."""
    return "channels-last" if channels_last else DEFAULT_LAYOUT


def in_layout(value: nn.Module | torch.Tensor, layout: str) -> nn.Module | torch.Tensor:
    """A module (its 4-D weights, in place) or a tensor (if 4-D, else as it is) in memory `layout`:
    a profile, a validation and a measurement each run every network, dense or compacted, in one."""
    if isinstance(value, nn.Module):
        return value.to(memory_format=LAYOUTS[layout])
    return value.contiguous(memory_format=LAYOUTS[layout]) if value.dim() == 4 else value


def is_channels_last(x: torch.Tensor) -> bool:
    """Whether a tensor is laid out channels-last, and not also contiguous (as a 1x1 plane is)."""
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def resolve_device(name: str) -> torch.device:
    """Turn a --device value into a torch.device, refusing one this machine does not have."""
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise UserError(f"unknown device '{name}': use cpu, cuda or cuda:N") from e
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(
                f"--device {name} but no CUDA GPU is available to torch {torch.__version__}; "
                "use --device cpu, or install a CUDA build of torch on a GPU machine"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"--device {name} but only {torch.cuda.device_count()} GPU(s) exist; pick one below that")
    elif device.type != "cpu":
        raise UserError(f"unsupported device '{name}': use cpu, cuda or cuda:N")
    return device


def set_threads(threads: int | None) -> int:
    """Pin intra-op threads (None keeps torch's default) and return the count in force."""
    if threads is not None:
        if threads < 1:
            raise UserError(f"--threads must be at least 1, got {threads}")
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def versions() -> dict[str, str]:
    """Library versions that change numbers: stored with checkpoints, profiles and benchmark results."""
    import torchvision

    from . import __version__

    return {
        "sparsesearch": __version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "cuda": torch.version.cuda or "none",
    }


def machine() -> dict[str, str | int]:
    """A description of this machine good enough to tell two benchmark results apart."""
    return {
        "platform": platform.platform(),
        "processor": _cpu_model(),
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "none",
    }


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
