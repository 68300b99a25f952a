"""Early exits and cascades: their MACs against torch's FLOP counter, exit heads on an
unchanged backbone, a cascade that always exits is its first model."""
from __future__ import annotations

import pytest
import torch

import models
from dynviz import policy as P
from dynviz.adaptive import NOT_REACHED, AdaptiveClassifier
from tests.helpers import colour_images, confident_system, flops_macs, randomize


def test_stage_macs_equal_flop_counter():
    for name, kw in (("exits_resnet20", {}), ("exits_resnet20", {"head_convs": (3, 2)}),
                     ("cascade_r8_r20_r56", {})):
        system = models.create(name, **kw).eval()
        x = torch.randn(1, 3, 32, 32)
        with torch.no_grad():
            assert flops_macs(lambda: system(x)) == system.macs() == sum(system.stage_macs())
            out = system(x)
        assert out.stage_macs[0].tolist() == system.stage_macs()
        assert out.macs[0].item() == system.macs()
        if system.can_jump:          # a jump runs the last network alone: what it counts
            last = system.stages[-1]
            assert out.trace.jump_macs.tolist() == [flops_macs(lambda: last(x))]


def test_exit_heads_read_the_backbone_unchanged():
    system = randomize(models.create("exits_resnet20").eval(), seed=1)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        out = system(x)
        assert torch.allclose(out.stage_logits[:, -1], system.backbone(x).logits, atol=1e-5)
    assert torch.equal(out.logits, out.stage_logits[:, -1])   # the answer: the last exit's


def test_cascade_that_always_exits_is_its_first_model(ws):
    system = confident_system("cascade_r8_r20_r56", members=("resnet8", "resnet8", "resnet20"))
    x = ws.data.to_tensor(colour_images(6))
    always = P.Policy("constant", "max_prob", "chain", 0.0, (P.ALWAYS, P.ALWAYS))
    with torch.no_grad():
        out = AdaptiveClassifier(system, always)(x)
        logits, trace = out.logits, out.trace
        assert torch.equal(logits, system.stages[0](x).logits)
    assert (trace.exit_stage == 0).all()
    assert (trace.macs == system.stage_macs()[0]).all()
    assert (trace.decisions[:, 1:] == NOT_REACHED).all()


def test_deeper_exit_heads_run_their_extra_convs():
    # by formula: a stride-2 conv C -> 2C to (H/2)², then (convs - 1) 2C -> 2C convs there
    def head_macs(c: int, side: int, convs: int) -> int:
        out = (side // 2) ** 2
        return c * 2 * c * 9 * out + (convs - 1) * (2 * c) ** 2 * 9 * out + 2 * c * 10

    system = models.create("exits_resnet20", head_convs=(3, 2)).eval()
    assert [h.macs(hw) for h, hw in zip(system.heads, [(32, 32), (16, 16)])] == \
        [head_macs(16, 32, 3), head_macs(32, 16, 2)]
    shallow = models.create("exits_resnet20").eval()
    extra = [b - a for a, b in zip(shallow.stage_macs(), system.stage_macs())]
    assert extra == [2 * 32 * 32 * 9 * 16 * 16, 64 * 64 * 9 * 8 * 8, 0]


def test_exit_head_counts_are_checked():
    with pytest.raises(ValueError, match="one count per exit"):
        models.create("exits_resnet20", head_convs=(1, 2, 3))
    with pytest.raises(ValueError, match="at least one conv"):
        models.create("exits_resnet20", head_convs=0)
