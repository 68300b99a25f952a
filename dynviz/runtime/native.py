"""The native block runner (``models/csrc/blocks.cpp``): build, load, and hand it blocks.

A folded ResNet's blocks, plain or gated, can run from C++ with no Python between the ops
(``dynviz.runtime.fold``): at batch 1 on CIFAR widths, Python's per-op overhead is a visible
share of a block, and the gated path pays it many times per block, skipped or not; in large
batches the gated path's compaction (gathering a block's sub-batch, merging its outputs
back, pooling for the next gates) is memory traffic that fused loops cut. The Python paths
stay the reference and the fallback: tests hold the two to each other, and nothing needs
the extension.

It is compiled on first use with the C++ compiler torch's extensions use (a minute on two
cores) into ``dynviz.settings.native_dir()``; ``DYNVIZ_NATIVE=0`` turns it off.
"""
from __future__ import annotations

import logging
import os
import shutil
import sys
import threading
from collections.abc import Iterable
from pathlib import Path
from types import ModuleType

import torch

import models
from dynviz import settings

log = logging.getLogger(__name__)

SOURCE = Path(models.__file__).resolve().parent / "csrc" / "blocks.cpp"
_loaded: dict[Path, ModuleType | None] = {}   # one extension per build directory and process
_loading = threading.Lock()


def module() -> ModuleType | None:
    """The native block runner, built on first use; None when it is turned off
    (``DYNVIZ_NATIVE=0``) or cannot be built here."""
    if not settings.native_enabled():
        return None
    return load(settings.native_dir())


def build_dir_for(root: Path) -> Path:
    """A subdirectory per torch version: an extension is only loadable by the torch it was
    built against."""
    return root / f"torch-{torch.__version__.replace('+', '_')}"


def load(root: Path) -> ModuleType | None:
    """The compiled extension from ``build_dir_for(root)``, compiling it first when it is
    missing or older than its source. ``None``, with the reason logged once per process,
    when there is no compiler or the build fails. Threads of one process build it once."""
    directory = build_dir_for(root)
    with _loading:
        if directory not in _loaded:
            _loaded[directory] = _build(directory)
    return _loaded[directory]


def _build(directory: Path) -> ModuleType | None:
    built = any(directory.glob("dynviz_blocks*.so"))
    if not built and shutil.which("c++") is None and shutil.which("g++") is None:
        log.warning("no C++ compiler: the native block runner is off (Python blocks run)")
        return None
    try:
        quiet = logging.getLogger("torch.utils.cpp_extension")
        level = quiet.level
        quiet.setLevel(logging.ERROR)      # its import warns that CUDA is absent
        try:
            from torch.utils import cpp_extension
        finally:
            quiet.setLevel(level)
        directory.mkdir(parents=True, exist_ok=True)
        _put_ninja_on_path()
        if not built:
            log.warning("compiling the native block runner into %s (about a minute, once)",
                        directory)
        # processes take turns through torch's lock on the build directory: the kernel's,
        # released when its holder dies, so a build killed halfway blocks no later start
        return cpp_extension.load("dynviz_blocks", [str(SOURCE)],
                                  build_directory=str(directory),
                                  extra_cflags=["-O3", "-fopenmp-simd"], verbose=False)
    except Exception as err:   # compiler or ninja missing or failing: Python blocks run
        reason = str(err).strip().splitlines()[-1] if str(err).strip() else repr(err)
        log.warning("the native block runner could not be built (%s); Python blocks run",
                    reason)
        log.debug("the build's whole error (the compiler's output):\n%s", err)
        return None


def _put_ninja_on_path() -> None:
    """The ninja that requirements.txt installs beside this interpreter comes first on PATH,
    whether or not its bin directory was there (another ninja version rewrites the build
    log and rebuilds it all). Set once for the process, never undone: a value that changed
    back and forth would race with other threads reading PATH."""
    here = str(Path(sys.executable).parent)
    path = os.environ.get("PATH", "")
    if path.split(os.pathsep)[:1] != [here]:
        os.environ["PATH"] = os.pathsep.join([here, path]) if path else here


def _conv_fields(conv) -> tuple[list[torch.Tensor], list[int]]:
    """(weight, bias) and (stride, padding) of a ``FoldedConv`` (or None: absent)."""
    empty = torch.empty(0)
    if conv is None:
        return [empty, empty], [1, 0]
    if conv.dilation != (1, 1) or conv.groups != 1 or len(set(conv.stride)) != 1 \
            or len(set(conv.padding)) != 1:
        raise ValueError("the native runner takes square, undilated, ungrouped convs")
    return [conv.weight, empty if conv.bias is None else conv.bias], \
        [conv.stride[0], conv.padding[0]]


def block_spec(conv1, conv2, conv3, downsample, *, gather: torch.Tensor | None = None,
               gate_weight: torch.Tensor | None = None, gate_bias: torch.Tensor | None = None,
               mid_channels: int = 0, sequential: bool = True,
               ) -> tuple[list[torch.Tensor], list[int]]:
    """One block's tensors and ints in the layout ``Blocks`` takes (see blocks.cpp);
    ``sequential``: the gates' placement (parallel ones run beside conv1)."""
    tensors, ints = [], []
    for conv in (conv1, conv2, conv3, downsample):
        t, n = _conv_fields(conv)
        tensors += t
        ints += n
    empty = torch.empty(0)
    tensors += [empty if v is None else v for v in (gather, gate_weight, gate_bias)]
    return tensors, ints + [mid_channels, int(sequential)]


def blocks(ext: ModuleType, specs: Iterable[tuple[list[torch.Tensor], list[int]]]):
    """A ``Blocks`` runner over ``block_spec``s (it keeps references to the tensors)."""
    specs = list(specs)
    return ext.Blocks([s[0] for s in specs], [s[1] for s in specs])


def accepts(x: torch.Tensor) -> bool:
    """Whether the native runner takes ``x``: float32 on the CPU, no autograd."""
    return x.dtype == torch.float32 and x.device.type == "cpu" and \
        not (torch.is_grad_enabled() and x.requires_grad)
