"""Run by tests/test_train.py under torchrun: a few data-parallel steps of a small recipe on
the built-in workspace (as the environment redirects it), then every rank saves its weights
to ``<out>/rank<R>.pt``."""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from dynviz import train, workspace
from dynviz.recipes import RECIPES


def main(out: Path) -> None:
    train.init_distributed()
    recipe = dataclasses.replace(RECIPES["resnet8"], epochs=1, batch_size=16, bf16=False)
    run = train.fit(workspace.builtin(), "ddp-test", recipe, limit_batches=3, progress=False)
    torch.save(run.model.state_dict(), out / f"rank{dist.get_rank()}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
