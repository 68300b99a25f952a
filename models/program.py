"""A system from outside: a classifier exported with ``torch.export`` (a ``.pt2`` file).

No Python class is needed to run one: ``load_program`` reads the program, checks once that it
maps (B, 3, S, S) images to (B, n_classes) logits, and counts its MACs on one image. The
result answers like a plain ``ResNet``: a static system (every image costs ``macs()``), its
own dense counterpart, and a possible cascade stage.

Costs are ``FlopCounterMode`` / 2 on one image, the reference the tests hold our own MAC
tables to; for a network of convs and linear layers that is exactly their MACs (an
attention network's matrix products count too).
"""
from __future__ import annotations

import zipfile
from pathlib import Path

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from models.output import Output


class ProgramError(ValueError):
    """A file that cannot serve as a classifier; the message is one line naming the file."""


class ProgramClassifier(nn.Module):
    """An exported classifier as a static system.

    Args:
        program: the runnable module of an ``ExportedProgram`` (``.module()``), mapping
            (B, 3, S, S) images to (B, ``num_classes``) logits.
        image_size: S, the side of the images it was checked and counted on.
        num_classes: its logits per image.
        macs: MACs of one image at ``image_size``.
        batched: whether the program takes a batch of any size; if not (exported with a
            fixed batch of 1), ``forward`` runs it image by image.
    """
    n_stages = 1

    def __init__(self, program: nn.Module, *, image_size: int, num_classes: int, macs: int,
                 batched: bool):
        super().__init__()
        self.program = program
        self.image_size, self.num_classes = image_size, num_classes
        self.batched = batched
        self._macs = macs

    def forward(self, x: torch.Tensor) -> Output:
        """(B, 3, S, S) normalised images -> ``Output`` (every image costs ``macs()``)."""
        if self.batched:
            logits = self.program(x)
        elif len(x):
            logits = torch.cat([self.program(image[None]) for image in x])
        else:   # a program of batch 1 cannot say what shape nothing has
            logits = x.new_zeros(0, self.num_classes)
        return Output.static(logits, self._macs)

    def train(self, mode: bool = True) -> ProgramClassifier:
        # The graph fixed batch norm and dropout when it was exported (load_program admits
        # only inference graphs), and an exported module refuses train()/eval(): only the
        # flag changes, so that the callers' model.eval() works on a cascade holding one.
        self.training = mode
        return self

    def _apply(self, fn, recurse=True):
        # Tensors the program computes with but does not own as parameters or buffers (a
        # normalisation mean, a literal) are plain attributes of its modules, which
        # nn.Module.to() would leave behind on the old device or dtype.
        super()._apply(fn, recurse)
        for module in self.program.modules():
            for name, value in list(vars(module).items()):
                if isinstance(value, torch.Tensor):
                    setattr(module, name, fn(value))
        return self

    def macs(self) -> int:
        """MACs of one image at ``image_size``."""
        return self._macs

    def stage_macs(self) -> list[int]:
        return [self._macs]

    def dense_counterpart(self) -> ProgramClassifier:
        """The static network a dynamic system is compared with: a static one is its own."""
        return self

    def cache_layout(self) -> dict:
        """What a cache of its outputs needs besides logits and MACs: nothing."""
        return {}


def load_program(path: str | Path, image_size: int, n_classes: int) -> ProgramClassifier:
    """The classifier exported (``torch.export.save``) to ``path``, checked on a (2, 3, S, S)
    input with S = ``image_size``; raises ``ProgramError`` if it is not one.

    A program exported with a dynamic batch dimension (``torch.export.Dim``) runs batches as
    they come; one exported for a batch of 1 runs image by image; one fixed to another batch
    size is refused. ``torch.export.load`` unpickles: load only files you trust.
    """
    path = Path(path)
    program = _read(path)
    device = next(iter(program.state_dict().values()), torch.empty(0)).device
    probe = torch.randn(2, 3, image_size, image_size,
                        generator=torch.Generator().manual_seed(0)).to(device)
    buffers = {name: b.clone() for name, b in program.named_buffers()}
    with torch.no_grad():
        batched = _takes_batches(program, probe)
        out = _logits(path, program, probe, batched, n_classes)
        again = _logits(path, program, probe, batched, n_classes)
        changed = [n for n, b in program.named_buffers() if not torch.equal(b, buffers[n])]
        if changed or not torch.allclose(again, out, rtol=1e-4, atol=1e-5):
            raise ProgramError(f"{path}: answers the same images differently on a second "
                               f"call{' and updates ' + changed[0] if changed else ''}: "
                               f"exported in training mode? export it after model.eval()")
        try:
            with FlopCounterMode(display=False) as counter:
                _run(path, program, probe[:1])
        except ProgramError as err:
            if not batched:
                raise
            raise ProgramError(f"{path}: runs a batch of 2 but not one image: export it with "
                               f"a dynamic batch (torch.export.Dim) or for one image "
                               f"({_line(err.__cause__)})") from err
    return ProgramClassifier(program, image_size=image_size, num_classes=n_classes,
                             macs=counter.get_total_flops() // 2, batched=batched)


def _read(path: Path) -> nn.Module:
    """The runnable module of the program saved at ``path``."""
    if not path.is_file():
        raise ProgramError(f"{path}: {'not a file' if path.exists() else 'no such file'}")
    if not zipfile.is_zipfile(path):
        raise ProgramError(f"{path}: not a torch.export program (a .pt2 file is a zip "
                           f"archive; this is not one)")
    try:
        with path.open("rb") as f:   # a file object: torch warns on a name not ending .pt2
            return torch.export.load(f).module()
    except Exception as err:
        raise ProgramError(f"{path}: not a torch.export program: {_line(err)}") from err


def _takes_batches(program: nn.Module, probe: torch.Tensor) -> bool:
    """Whether ``program`` runs a batch of 2 (else: exported for one image, or failing)."""
    try:
        program(probe)
    except Exception:
        return False
    return True


def _logits(path: Path, program: nn.Module, x: torch.Tensor, batched: bool,
            n_classes: int) -> torch.Tensor:
    """The program's answer to ``x`` as a batch or image by image, checked to be logits."""
    parts = [x] if batched else list(x.split(1))
    outs = [_run(path, program, part) for part in parts]
    for part, out in zip(parts, outs):
        _check_logits(path, out, (len(part), n_classes))
    return torch.cat(outs)


def _run(path: Path, program: nn.Module, x: torch.Tensor):
    try:
        return program(x)
    except Exception as err:
        hint = (f"; export it for {tuple(x.shape)} inputs, the batch fixed at 1 or dynamic "
                f"(torch.export.Dim)") if len(x) == 1 else ""
        raise ProgramError(f"{path}: fails on a {tuple(x.shape)} input: {_line(err)}{hint}"
                           ) from err


def _check_logits(path: Path, out, shape: tuple[int, int]) -> None:
    if not isinstance(out, torch.Tensor):
        what = f"a {type(out).__name__}" + (f" of {len(out)}" if isinstance(out, (tuple, list))
                                            else "")
        raise ProgramError(f"{path}: answers with {what}, not a {shape} tensor of logits "
                           f"(batch, n_classes)")
    if tuple(out.shape) != shape or not out.is_floating_point():
        raise ProgramError(f"{path}: answers a batch of {shape[0]} with a {out.dtype} tensor "
                           f"of shape {tuple(out.shape)}, not {shape} logits (batch, n_classes)")


def _line(err: Exception) -> str:
    first = str(err).strip().splitlines()
    return f"{type(err).__name__}: {first[0] if first else ''}"

