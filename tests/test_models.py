"""Registry-driven model tests and LC-Net reference tests (dense == open gates, sparse ==
masked, MACs == FlopCounterMode / 2)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torchvision

import models
from models.lcnet import GatedResNet, GateTrace, ReLU1
from models.registry import register_model
from tests.helpers import flops_macs, model_input, randomize

ALL = models.names()
GATED = [n for n in ALL if n.startswith("lcnet_")]
SMALL_GATED = [n for n in GATED if n in ("lcnet_resnet8", "lcnet_resnet20", "lcnet_resnet18",
                                         "lcnet_resnet50")]


# ---------------------------------------------------------------------------- registry
def test_registry_names_and_errors():
    assert {"resnet8", "resnet20", "resnet56", "resnet50", "lcnet_resnet56"} <= set(ALL)
    with pytest.raises(KeyError, match="unknown model"):
        models.create("resnet7")
    def resnet20():  # same name as a registered builder
        return nn.Identity()
    with pytest.raises(ValueError, match="registered twice"):
        register_model(resnet20)
    assert models.create("resnet20").__class__.__name__ == "ResNet"


def test_overrides_reach_the_config():
    m = models.create("resnet20", num_classes=7)
    assert m.fc.out_features == 7
    assert models.create("lcnet_resnet20", placement="parallel").blocks[0].gate_cfg.placement \
        == "parallel"
    with pytest.raises(ValueError, match="placement"):
        models.create("lcnet_resnet20", placement="diagonal")
    with pytest.raises(ValueError, match="6n\\+2"):
        models.resnet.cifar_config(21)


@pytest.mark.parametrize("name", ALL)
def test_forward_backward_reaches_every_parameter(name):
    model = models.create(name, zero_init_residual=False).train()
    x = model_input(model, 2)
    out = model(x)
    classes = model.dense_counterpart().cfg.num_classes
    assert out.stage_logits.shape == (2, model.n_stages, classes)
    assert torch.equal(out.logits, out.stage_logits[:, -1])
    assert torch.isfinite(out.stage_logits).all()
    assert out.macs.shape == (2,) and out.stage_macs.shape == (2, model.n_stages)
    assert torch.equal(out.macs, out.stage_macs.sum(1))
    loss = out.stage_logits.logsumexp(-1).mean()
    if isinstance(out.trace, GateTrace):    # gated: L1 terms give gates their own gradient
        loss = loss + out.trace.block_scores.mean() + sum(
            s.mean() for s in out.trace.channel_scores)
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, pname


# ---------------------------------------------------------------------------- MACs
@pytest.mark.parametrize("name", [n for n in ALL if not n.startswith("lcnet_")])
def test_dense_macs_equal_flop_counter(name):
    model = models.create(name).eval()
    cfg = getattr(model, "cfg", None)
    size = 224 if cfg is not None and cfg.stem == "imagenet" else 32
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        assert model.macs() == flops_macs(lambda: model(x))


def test_resnet50_is_4_09_gmacs():
    """The figure of torchvision's table and LC-Net's (ImageNet, 224²)."""
    assert abs(models.create("resnet50").macs() / 4.09e9 - 1) < 0.005


TORCHVISION = ["resnet18", "resnet50"]     # a basic-block and a bottleneck layout


def _torchvision(name: str, seed: int) -> nn.Module:
    """torchvision's ``name`` for 7 classes, random weights and BN statistics, eval mode."""
    return randomize(getattr(torchvision.models, name)(num_classes=7).eval(), seed=seed)


@pytest.mark.parametrize("name", TORCHVISION)
def test_torchvision_resnets_load_unchanged(name):
    reference = _torchvision(name, seed=4)
    ours = models.create(name, num_classes=7, input_size=64).eval()
    ours.load_state_dict(reference.state_dict())    # strict: the same keys and shapes
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x).logits, reference(x), atol=1e-5, rtol=1e-5)
        assert ours.macs() == flops_macs(lambda: reference(x[:1]))


@pytest.mark.parametrize("name", TORCHVISION)
def test_torchvision_weights_under_gates_that_start_open(name):
    """A user's torchvision checkpoint can be gated: only the gates are missing, and the
    gates a model is built with (zero weights, bias 1: S_L = S_C = 1) compute it unchanged."""
    reference = _torchvision(name, seed=5)
    gated = models.create(f"lcnet_{name}", num_classes=7, input_size=64).eval()
    result = gated.load_state_dict(reference.state_dict(), strict=False)
    assert not result.unexpected_keys
    gates = {f"{b}.{gate}_gate.fc.{p}" for b in gated.block_names()
             for gate in ("block", "channel") for p in ("weight", "bias")}
    assert set(result.missing_keys) == gates
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = gated(x)
        assert (out.trace.block_scores == 1).all()
        assert all((s == 1).all() for s in out.trace.channel_scores)
        torch.testing.assert_close(out.logits, reference(x), atol=1e-5, rtol=1e-5)


def test_open_gates_trace_the_full_cost():
    model = models.create("lcnet_resnet20").eval()  # gates start open
    x = model_input(model, 3)
    with torch.no_grad():
        trace = model(x).trace
        counted = flops_macs(lambda: model(x))
    assert (trace.block_scores == 1).all()
    assert trace.macs.tolist() == [model.macs()] * 3 == [counted // 3] * 3


def test_parallel_placement_pays_for_the_whole_first_conv():
    seq = randomize(models.create("lcnet_resnet20", placement="sequential").eval(), seed=2)
    par = models.create("lcnet_resnet20", placement="parallel").eval()
    par.load_state_dict(seq.state_dict())
    x = model_input(seq, 4)
    with torch.no_grad():
        t_seq, t_par = seq(x).trace, par(x).trace
    # per executed block, parallel adds conv1's MACs of the channels that were off
    extra = torch.zeros(4, dtype=torch.long)
    for i, (block, costs) in enumerate(zip(seq.blocks, seq.block_costs())):
        off = (t_seq.channel_scores[i] <= 0).sum(1)
        per_channel = costs["conv1"] // block.mid_channels
        extra += torch.where(t_seq.blocks_executed[:, i], per_channel * off, 0)
    assert torch.equal(t_par.macs - t_seq.macs, extra)


# ---------------------------------------------------------------------------- references
@pytest.mark.parametrize("name", ["lcnet_resnet20", "lcnet_resnet18", "lcnet_resnet50"])
def test_open_gates_compute_exactly_the_plain_model(name):
    plain = randomize(models.create(name.removeprefix("lcnet_")).eval(), seed=3)
    gated = models.create(name).eval()
    gated.load_state_dict(plain.state_dict(), strict=False)
    with torch.no_grad():
        for m in gated.modules():  # force open: zero weights, bias >= 1 -> ReLU1 gives 1
            if isinstance(m, nn.Linear) and m is not gated.fc:
                m.weight.zero_()
                m.bias.fill_(2.0)
        x = model_input(plain, 2)
        out = gated(x)
        assert (out.trace.block_scores == 1).all()
        assert torch.equal(out.logits, plain(x).logits)


def test_relu1_clamps_at_inference_and_leaks_in_training():
    act = ReLU1(leak=0.1)
    z = torch.tensor([-2.0, 0.5, 3.0])
    assert act.eval()(z).tolist() == [0.0, 0.5, 1.0]
    assert torch.allclose(act.train()(z), torch.tensor([-0.2, 0.5, 1.2]))


def test_relu1_can_leak_in_the_gradient_only():
    act = ReLU1(leak=0.1, backward_only=True).train()
    z = torch.tensor([-2.0, 0.5, 3.0], requires_grad=True)
    out = act(z)
    assert out.tolist() == [0.0, 0.5, 1.0]                 # the inference forward
    out.sum().backward()
    assert z.grad.tolist() == pytest.approx([0.1, 1.0, 0.1])   # the leaky slopes
    gated = models.create("lcnet_resnet8", leak_backward_only=True).train()
    assert all(m.backward_only for m in gated.modules() if isinstance(m, ReLU1))


def test_trace_marks_executed_blocks_and_channels():
    model = randomize(models.create("lcnet_resnet20").eval(), seed=6)
    with torch.no_grad():
        trace = model(model_input(model, 4)).trace
    assert trace.block_scores.shape == (4, len(model.blocks))
    assert [s.shape[1] for s in trace.channel_scores] == [b.mid_channels for b in model.blocks]
    for i in range(len(model.blocks)):
        ran = trace.channels_executed(i)
        assert torch.equal(ran.any(1) & ~trace.blocks_executed[:, i],
                           torch.zeros(4, dtype=torch.bool))


def test_intermediates_match_the_blocks():
    model = randomize(models.create("resnet20").eval(), seed=8)
    x = model_input(model, 2)
    with torch.no_grad():
        outs = model.forward_intermediates(x, [2, 5, 8])
        assert [o.shape[1] for o in outs] == [16, 32, 64]
        assert torch.allclose(model.forward_head(outs[-1]), model(x).logits)
        again = model.forward_blocks(outs[0], 3, 6)
        assert torch.equal(again, outs[1])
    assert isinstance(models.create("lcnet_resnet20"), GatedResNet)



@pytest.mark.parametrize("name", ALL)
def test_every_model_knows_its_dense_counterpart(name):
    """Plain: itself; gated: the plain network with the same weights (open gates compute
    it); early exits: the backbone; cascade: the last network. Its MACs are the reference's
    the caches and budgets use."""
    model = randomize(models.create(name).eval(), seed=12)
    dense = model.dense_counterpart()
    assert not isinstance(dense, GatedResNet) and dense.n_stages == 1
    if name.startswith("exits_"):
        assert dense is model.backbone
    elif name.startswith("cascade_"):
        assert dense is model.stages[-1]
    elif not name.startswith("lcnet_"):
        assert dense is model
    else:
        x = model_input(model, 2)
        with torch.no_grad():
            for m in model.modules():   # all gates open: the gated net is its plain net
                if isinstance(m, nn.Linear) and m is not model.fc:
                    m.weight.zero_()
                    m.bias.fill_(2.0)
            torch.testing.assert_close(model(x).logits, dense(x).logits)
        assert dense.macs() == model.plain_macs()
        if model.cfg.stem == "cifar":     # counted at the size the MACs are for
            assert dense.macs() == flops_macs(lambda: dense(x[:1]))
