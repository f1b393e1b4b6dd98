"""The compiled kernel (`gather_gemm.c`): built on first use by the machine's C compiler for its own
CPU (-march=native: the vector width decides the tile), cached, and called through ctypes.

Why C: a shape-wise conv in eager torch builds its reduced im2col in memory and then multiplies it;
the gather was 15-20% of AlexNet's conv2-5 at 15x fewer MACs, more on small layers. Read in place by
the GEMM's own microkernel, it costs nothing more than the packing any BLAS does. No torch headers:
a plain C file compiles in under a second, where a torch extension takes a minute.

Where no compiler is found, or `SPARSESEARCH_NATIVE=0`, `kernel()` is None and says why, and the
layers keep their eager form (`kernels.ShapeConv2d`)."""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

SOURCE = Path(__file__).with_name("gather_gemm.c")
FLAGS = ("-O3", "-march=native", "-shared", "-fPIC")
_LONG, _PTR = ctypes.c_long, ctypes.c_void_p
_OFF = "turned off by SPARSESEARCH_NATIVE=0"
_WARNED: list[str] = []


def _cpu() -> str:
    """What -march=native compiles for: the CPU's feature flags where Linux lists them. A cache shared by
    machines of other CPUs (a home directory on NFS) must not hand one a library it cannot run."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return f"{platform.machine()} {platform.processor()}"
    return next((line for line in info.splitlines() if line.startswith(("flags", "Features"))), info[:4096])


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "sparsesearch" / "native"


@dataclass(frozen=True)
class Kernel:
    """The loaded library. `panel_width`: output channels per weight panel (two vectors); `tile_pixels`:
    output pixels per tile (as many as the accumulators fit in the vector registers)."""

    library: ctypes.CDLL
    panel_width: int
    tile_pixels: int

    def packed_floats(self, columns: int) -> int:
        """The scratch that `shape_conv` needs to pack tiles of `columns` kept columns."""
        return self.library.ss_packed_size(columns)

    def shape_conv(self, x: Tensor, geometry: tuple[int, ...], start: Tensor, panels: Tensor, bias: Tensor | None,
                   out_channels: int, y_strides: tuple[int, int, int]) -> ShapeConv:
        """The shape-wise conv of inputs shaped and strided as x (N, C, H, W float32), its arguments (as
        `ss_shape_conv` takes them) packed once: a layer calls it on every input of that size."""
        pointers = [t.data_ptr() if t is not None else 0 for t in (start, panels, bias)]
        values = [*x.shape, *x.stride(), *geometry, pointers[0], len(start), *pointers[1:], out_channels, *y_strides]
        return ShapeConv(self.library.ss_shape_conv, (ctypes.c_longlong * len(values))(*values), (start, panels, bias))


@dataclass(frozen=True)
class ShapeConv:
    """One layer's compiled conv for one input size and layout: `run(x, buf, packed, y)`, with x and y as
    the layer's input and output of that size and layout, buf and packed its scratch (`Kernel`'s sizes;
    packed None where the layer does not pack). Holds the tensors its arguments point into."""

    function: Callable[..., None]
    arguments: ctypes.Array
    holds: tuple[Tensor | None, ...]

    def run(self, x: Tensor, buf: int, packed: int | None, y: Tensor) -> None:
        self.function(x.data_ptr(), buf, packed, y.data_ptr(), self.arguments)


def _compile(compiler: str, path: Path) -> str | None:
    """Build the library at `path`: beside it, then renamed (atomic, so concurrent builds do no harm);
    why it failed, or None."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
    except OSError as e:
        return f"cannot write its cache {path.parent}: {e.strerror} (set XDG_CACHE_HOME to a writable folder)"
    os.close(fd)
    try:
        done = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", tmp], capture_output=True, text=True)
        if done.returncode != 0:
            return f"{compiler} failed on {SOURCE.name}: {(done.stderr.strip().splitlines() or [''])[-1]}"
        os.replace(tmp, path)
        return None
    finally:
        Path(tmp).unlink(missing_ok=True)


@functools.cache
def _built() -> Kernel | str:
    """The kernel, or why there is none."""
    if os.environ.get("SPARSESEARCH_NATIVE", "1") == "0":
        return _OFF
    compiler = os.environ.get("CC", "cc")
    if shutil.which(compiler) is None:
        return f"no C compiler ({compiler!r} not found; install gcc, or set CC)"
    source = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join([source, " ".join(FLAGS).encode(), compiler.encode(), _cpu().encode()]))
    path = _cache_dir() / f"gather_gemm-{key.hexdigest()[:16]}.so"
    if not path.exists() and (failed := _compile(compiler, path)):
        return failed
    try:
        library = ctypes.CDLL(str(path))
    except OSError as e:
        return f"cannot load {path}: {e}"
    library.ss_panel_width.restype = library.ss_tile_pixels.restype = ctypes.c_int
    library.ss_packed_size.restype = ctypes.c_long
    library.ss_packed_size.argtypes = [_LONG]
    library.ss_shape_conv.restype = None
    library.ss_shape_conv.argtypes = [_PTR, _PTR, _PTR, _PTR, _PTR]
    return Kernel(library, library.ss_panel_width(), library.ss_tile_pixels())


def kernel() -> Kernel | None:
    """The compiled kernel, built once per machine; None where it cannot be (`unavailable` says why,
    and a warning once per process, unless the user turned it off)."""
    built = _built()
    if isinstance(built, str) and built != _OFF and not _WARNED:
        _WARNED.append(built)
        warnings.warn(f"shape- and channel-wise convs run without their compiled kernel, up to 2x slower: {built}",
                      stacklevel=2)
    return built if isinstance(built, Kernel) else None


def unavailable() -> str | None:
    """Why there is no compiled kernel, or None."""
    built = _built()
    return None if isinstance(built, Kernel) else built


def usable(x: Tensor, weight: Tensor) -> bool:
    """Whether a call on x can take the compiled kernel: float32 input and weights on a CPU, without
    autograd. It runs on the calling thread only; at several threads the layer times it against torch's
    threaded product."""
    return (x.device.type == weight.device.type == "cpu" and x.dtype == weight.dtype == torch.float32
            and x.dim() == 4 and not (x.requires_grad and torch.is_grad_enabled()) and kernel() is not None)
