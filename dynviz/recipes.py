"""Training recipes: every hyper-parameter of a run in one frozen dataclass, and the named
recipes ``python -m dynviz train RECIPE`` runs. What each gave is in docs/results.md."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch.nn as nn

import models


@dataclass(frozen=True)
class Recipe:
    model: str                       # registry name
    epochs: int
    batch_size: int = 128            # per process
    peak_lr: float = 0.1             # one-cycle peak, SGD with Nesterov momentum
    momentum: float = 0.9
    weight_decay: float = 5e-4       # not applied to BN and bias parameters
    label_smoothing: float = 0.1
    warmup: float = 0.15             # fraction of steps rising to the peak
    seed: int = 0
    bf16: bool = True                # autocast convs/matmuls to bfloat16 (docs/benchmarks.md)
    init_from: str | None = None     # checkpoint whose weights start the model (non-strict)
    gate_lr: float | None = None     # peak LR of gate parameters (None: same as backbone)
    freeze_gates: bool = False       # gate parameters keep their starting values
    l1_block: float = 0.0            # α, weight of mean |S_L|
    l1_channel: float = 0.0          # β, weight of mean |S_C|
    mac_budget: float = 0.0          # > 0: the L1 terms apply only to batches above these MACs
    model_args: tuple[tuple[str, object], ...] = ()  # overrides for models.create
    init_into: str = ""              # module path the init_from weights load into
    trainable: str = ""              # train only parameters under this prefix ("": all)
    distill: float = 0.0             # weight of the teacher: the final exit (staged models)
    distill_temperature: float = 3.0
    teacher: str | None = None       # else this frozen checkpoint (by name) teaches
    cycles: int = 1                  # the one-cycle schedule, repeated (warm restarts)

    def __post_init__(self):
        if self.cycles < 1 or self.epochs % self.cycles:
            raise ValueError(f"{self.epochs} epochs do not split into {self.cycles} cycles")
        if self.teacher and not 0 < self.distill <= 1:
            raise ValueError(f"a teacher needs a distill weight in (0, 1]; got {self.distill}")

    @property
    def cycle_epochs(self) -> int:
        return self.epochs // self.cycles

    def build(self) -> nn.Module:
        return models.create(self.model, **dict(self.model_args))


# Early-exit heads on the frozen resnet56, each distilled from the final head.
_EXITS = Recipe("exits_resnet56", epochs=16, peak_lr=0.05, init_from="resnet56",
                init_into="backbone", trainable="heads.", distill=0.5)

# LC-Net gates on the trained resnet56, pulled to skip blocks rather than channels.
_LCNET_BLOCKS = Recipe("lcnet_resnet56", epochs=8, peak_lr=0.02, gate_lr=0.1,
                       init_from="resnet56", l1_block=1.0, l1_channel=0.3)
# The same, learning from the frozen resnet56 too (distillation, weight 0.7).
_LCNET_KD = dataclasses.replace(_LCNET_BLOCKS, teacher="resnet56", distill=0.7)

RECIPES: dict[str, Recipe] = {
    "resnet8": Recipe("resnet8", epochs=30),
    "resnet20": Recipe("resnet20", epochs=60),
    # Four 40-epoch one-cycle schedules with warm restarts, each continuing the last.
    "resnet56": Recipe("resnet56", epochs=160, cycles=4),
    # From scratch; α and β scaled from lcnet_resnet56's to give each gate the same pull.
    "lcnet_resnet20": Recipe("lcnet_resnet20", epochs=30, gate_lr=0.1,
                             l1_block=0.033, l1_channel=0.33),
    # Channels pulled harder than blocks (β = 10 α), gates at their own larger LR.
    "lcnet_resnet56": Recipe("lcnet_resnet56", epochs=12, peak_lr=0.02, gate_lr=0.1,
                             init_from="resnet56", l1_block=0.1, l1_channel=1.0),
    # The pull reversed: per MAC saved, blocks pulled harder than channels.
    "lcnet_resnet56_blocks": _LCNET_BLOCKS,
    # lcnet_resnet56_blocks distilled from the frozen resnet56.
    "lcnet_resnet56_kd": _LCNET_KD,
    # lcnet_resnet56_kd with twice the pull on blocks (α = 2).
    "lcnet_resnet56_kd_a2": dataclasses.replace(_LCNET_KD, l1_block=2.0),
    # lcnet_resnet56_kd for 16 epochs; the default systems lcnet_resnet56_seq/_par load it.
    "lcnet_resnet56_kd16": dataclasses.replace(_LCNET_KD, epochs=16),
    # Trial, not adopted: lcnet_resnet56_kd for 32 epochs.
    "lcnet_resnet56_kd32": dataclasses.replace(_LCNET_KD, epochs=32),
    # Trial, not adopted: lcnet_resnet56_kd16 trained 16 epochs more (a fresh schedule).
    "lcnet_resnet56_kd16_more": dataclasses.replace(_LCNET_KD, epochs=16,
                                                    init_from="lcnet_resnet56_kd16"),
    # Trial, not adopted: kd16 with α = 2 pulling only while a batch spends over 48 M MACs.
    "lcnet_resnet56_budget": dataclasses.replace(_LCNET_KD, epochs=16, l1_block=2.0,
                                                 mac_budget=48e6),
    # Trial 1 of docs/lcnet.md: kd16 trained 8 epochs more with its gates frozen, no pull.
    "lcnet_resnet56_kd16_frozen": dataclasses.replace(
        _LCNET_KD, epochs=8, init_from="lcnet_resnet56_kd16", l1_block=0.0, l1_channel=0.0,
        freeze_gates=True),
    "exits_resnet56": _EXITS,
    "exits_resnet56_e8": dataclasses.replace(_EXITS, epochs=8),
    # Trial, not adopted: the heads trained 32 epochs.
    "exits_resnet56_e32": dataclasses.replace(_EXITS, epochs=32),
    # Earlier layouts, kept to compare against: one-conv heads after blocks 8-23 ...
    "exits_resnet56_shallow": dataclasses.replace(
        _EXITS, epochs=8, model_args=(("exits", (8, 13, 17, 19, 21, 23)), ("head_convs", 1))),
    # ... and two-conv heads in stage 2.
    "exits_resnet56_stage2x2": dataclasses.replace(
        _EXITS, epochs=8, model_args=(("head_convs", (2, 2, 1, 1, 1)),)),
}
