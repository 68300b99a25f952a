"""Registry-driven model tests and LC-Net reference tests (dense == open gates, sparse ==
masked, MACs == FlopCounterMode / 2)."""
from __future__ import annotations

import threading

import pytest
import torch
import torch.nn as nn
import torchvision
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count

import models
from models.lcnet import GatedResNet, ReLU1, SliceCache, SparsePlan
from models.registry import register_model

ALL = models.names()
GATED = [n for n in ALL if n.startswith("lcnet_")]
SMALL_GATED = [n for n in GATED if n in ("lcnet_resnet8", "lcnet_resnet20", "lcnet_resnet18",
                                         "lcnet_resnet50")]


def _input(model: nn.Module, batch: int, size: int | None = None, seed: int = 0):
    cfg = getattr(model, "cfg", None)
    size = size or (64 if cfg is not None and cfg.stem == "imagenet" else 32)
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _logits(out):
    return out[0] if isinstance(out, tuple) else out


def _onednn_conv_flop(x_shape, w_shape, _bias, _padding, _stride, _dilation, _groups, *args,
                      out_shape=None, **kwargs) -> int:
    return conv_flop_count(x_shape, w_shape, out_shape)


def flop_counter() -> FlopCounterMode:
    """torch's FLOP counter, also counting the oneDNN convolution that large inference convs
    call directly (``models.resnet.conv2d``), with torch's own convolution formula."""
    return FlopCounterMode(display=False,
                           custom_mapping={torch.ops.aten.mkldnn_convolution: _onednn_conv_flop})


def flops_macs(fn) -> int:
    with flop_counter() as counter:
        fn()
    return counter.get_total_flops() // 2


def randomize(model: nn.Module, seed: int = 0, open_fraction: float = 0.5) -> nn.Module:
    """Random BN statistics and random gates: about ``open_fraction`` of block and channel
    scores > 0, some of them strictly between 0 and 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
        for block in getattr(model, "blocks", []):
            # residual branches small against the identity, as in a trained ResNet: keeps
            # a 110-layer random network's activations O(1) in float32
            last_bn = getattr(block, "bn3", block.bn2)
            last_bn.weight.mul_(0.2)
        for name, m in model.named_modules():
            if name.endswith("_gate.fc"):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 2 / m.in_features**0.5)
                # bias b: P(score > 0) ~ open_fraction for a unit-variance pre-activation
                shift = torch.distributions.Normal(0, 1).icdf(torch.tensor(1 - open_fraction))
                m.bias.fill_(-float(shift))
    return model


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
    x = _input(model, 2)
    out = model(x)
    logits = _logits(out)
    staged = hasattr(model, "run_stage")
    expected = (2, model.n_stages, 10) if staged else (2, model.cfg.num_classes)
    assert logits.shape == expected
    assert torch.isfinite(logits).all()
    loss = logits.logsumexp(1).mean()
    if isinstance(out, tuple) and not staged:  # gated: L1 terms give gates their own gradient
        loss = loss + out[1].block_scores.mean() + sum(s.mean() for s in out[1].channel_scores)
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


def test_resnet50_is_4_09_gmacs_and_loads_torchvision_weights():
    reference = torchvision.models.resnet50().eval()
    ours = models.create("resnet50").eval()
    ours.load_state_dict(reference.state_dict())  # unchanged keys and shapes
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(ours(x), reference(x), atol=1e-5)
        assert ours.macs() == flops_macs(lambda: reference(x))
    assert abs(ours.macs() / 4.09e9 - 1) < 0.005


def test_gated_resnet50_takes_torchvision_weights_non_strict():
    gated = models.create("lcnet_resnet50")
    result = gated.load_state_dict(torchvision.models.resnet50().state_dict(), strict=False)
    assert not result.unexpected_keys
    assert result.missing_keys and all("_gate." in k for k in result.missing_keys)


@pytest.mark.parametrize("placement", ["parallel", "sequential"])
@pytest.mark.parametrize("name", SMALL_GATED)
def test_sparse_path_spends_exactly_the_traced_macs(name, placement):
    """Batch 1: FlopCounterMode over the sparse executor == the trace's MACs (gates,
    shortcut, executed blocks and channels), for random gate patterns."""
    model = randomize(models.create(name, placement=placement).eval(), seed=1)
    skipped = 0
    for seed in range(4):
        x = _input(model, 1, seed=seed)
        with torch.no_grad():
            counted = flops_macs(lambda: model(x, SparsePlan(1.0)))
            _, trace = model(x, SparsePlan(1.0))
        assert trace.macs.item() == counted
        skipped += (~trace.blocks_executed).sum().item()
    assert skipped > 0  # the patterns do skip blocks


def test_open_gates_trace_the_full_cost():
    model = models.create("lcnet_resnet20").eval()  # gates start open
    x = _input(model, 3)
    with torch.no_grad():
        _, trace = model(x)
        counted = flops_macs(lambda: model(x))
    assert (trace.block_scores == 1).all()
    assert trace.macs.tolist() == [model.macs()] * 3 == [counted // 3] * 3


def test_parallel_placement_pays_for_the_whole_first_conv():
    seq = randomize(models.create("lcnet_resnet20", placement="sequential").eval(), seed=2)
    par = models.create("lcnet_resnet20", placement="parallel").eval()
    par.load_state_dict(seq.state_dict())
    x = _input(seq, 4)
    with torch.no_grad():
        _, t_seq = seq(x)
        _, t_par = par(x)
    # per executed block, parallel adds conv1's MACs of the channels that were off
    extra = torch.zeros(4, dtype=torch.long)
    for i, (block, costs) in enumerate(zip(seq.blocks, seq.block_costs())):
        off = (t_seq.channel_scores[i] <= 0).sum(1)
        extra += torch.where(t_seq.blocks_executed[:, i], costs["conv1"] // block.mid_channels * off, 0)
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
        x = _input(plain, 2)
        logits, trace = gated(x)
        assert (trace.block_scores == 1).all()
        assert torch.equal(logits, plain(x))


@pytest.mark.parametrize("placement", ["parallel", "sequential"])
@pytest.mark.parametrize("name", GATED)
def test_sparse_equals_masked(name, placement):
    model = randomize(models.create(name, placement=placement).eval(), seed=4)
    size = 32 if model.cfg.stem == "cifar" else 64
    for batch, slice_below, by_matmul in ((1, 1.0, False), (1, 0.0, True), (6, 1.0, True),
                                          (6, 0.0, False), (6, 0.5, False)):
        x = _input(model, batch, size, seed=batch).contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            masked, t_masked = model(x)
            sparse, t_sparse = model(x, SparsePlan(slice_below, pool_by_matmul=by_matmul))
        rel = (sparse - masked).norm() / masked.norm()
        assert rel <= 1e-4, (batch, slice_below, rel)
        assert torch.allclose(t_masked.block_scores, t_sparse.block_scores, atol=1e-5)
        assert torch.equal(t_masked.blocks_executed, t_sparse.blocks_executed)
        assert torch.equal(t_masked.macs, t_sparse.macs)


def test_sparse_handles_all_skipped_and_all_channels_off():
    model = randomize(models.create("lcnet_resnet20").eval(), seed=5)
    x = _input(model, 3)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear) and m.out_features == 1:   # L-Net: all blocks open
                m.weight.zero_()
                m.bias.fill_(0.7)
            elif isinstance(m, nn.Linear) and m is not model.fc:  # C-Net: all channels off
                m.weight.zero_()
                m.bias.fill_(-1.0)
        masked, _ = model(x)
        sparse, trace = model(x, SparsePlan(1.0))
        assert torch.allclose(sparse, masked, rtol=1e-5, atol=1e-6)
        for m in model.modules():  # now every block skips
            if isinstance(m, nn.Linear) and m.out_features == 1:
                m.bias.fill_(-1.0)
        masked, _ = model(x)
        sparse, trace = model(x, SparsePlan(1.0))
        assert torch.allclose(sparse, masked, rtol=1e-5, atol=1e-6)
        assert not trace.blocks_executed.any()


@pytest.mark.parametrize("placement", ["parallel", "sequential"])
def test_sparse_equals_masked_with_saturated_channel_scores(placement):
    """Channel scores exactly 0 or 1 (as a trained ReLU-1 gives them; the batch-1 path then
    skips multiplying by them), block scores 1 or in (0, 1); sliced through a warm cache."""
    model = randomize(models.create("lcnet_resnet20", placement=placement).eval(), seed=8)
    g = torch.Generator().manual_seed(8)
    with torch.no_grad():
        for i, block in enumerate(model.blocks):
            block.block_gate.fc.weight.zero_()
            block.block_gate.fc.bias.fill_(1.5 if i % 2 else 0.6)
            gate = block.channel_gate.fc
            gate.weight.zero_()
            gate.bias.copy_(torch.where(torch.rand(gate.out_features, generator=g) < 0.5,
                                        -2.0, 2.0))
            block.freeze()
        for plan in (SparsePlan(0.0), SparsePlan(1.0, 1.0, SliceCache(0)),
                     SparsePlan(1.0, 1.0, SliceCache(64 << 20))):   # masks, slices, cached
            for seed in range(3):   # the set recurs from the second image on
                x = _input(model, 1, seed=seed)
                masked, trace = model(x)
                sparse, _ = model(x, plan)
                assert set(torch.cat(trace.channel_scores, 1).unique().tolist()) == {0.0, 1.0}
                torch.testing.assert_close(sparse, masked, rtol=1e-4, atol=1e-5)


def test_sparse_path_refuses_training_mode():
    model = models.create("lcnet_resnet8").train()
    with pytest.raises(RuntimeError, match="eval mode"):
        model(_input(model, 2), SparsePlan(1.0))


def test_relu1_clamps_at_inference_and_leaks_in_training():
    act = ReLU1(leak=0.1)
    z = torch.tensor([-2.0, 0.5, 3.0])
    assert act.eval()(z).tolist() == [0.0, 0.5, 1.0]
    assert torch.allclose(act.train()(z), torch.tensor([-0.2, 0.5, 1.2]))


def test_trace_marks_executed_blocks_and_channels():
    model = randomize(models.create("lcnet_resnet20").eval(), seed=6)
    with torch.no_grad():
        _, trace = model(_input(model, 4))
    assert trace.block_scores.shape == (4, len(model.blocks))
    assert [s.shape[1] for s in trace.channel_scores] == [b.mid_channels for b in model.blocks]
    for i in range(len(model.blocks)):
        ran = trace.channels_executed(i)
        assert torch.equal(ran.any(1) & ~trace.blocks_executed[:, i],
                           torch.zeros(4, dtype=torch.bool))


def test_one_model_serves_concurrent_callers():
    """No per-call state on the module: threads with different inputs get their own answers."""
    model = randomize(models.create("lcnet_resnet20").eval(), seed=7)
    inputs = [_input(model, 1 + i % 3, seed=i) for i in range(8)]
    with torch.no_grad():
        expected = [model(x, SparsePlan(0.5)) for x in inputs]
    results = [None] * len(inputs)

    def work(i):
        with torch.no_grad():
            results[i] = model(inputs[i], SparsePlan(0.5))
    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for (logits, trace), (ref_logits, ref_trace) in zip(results, expected):
        assert torch.equal(logits, ref_logits) and torch.equal(trace.macs, ref_trace.macs)


def test_intermediates_match_the_blocks():
    model = randomize(models.create("resnet20").eval(), seed=8)
    x = _input(model, 2)
    with torch.no_grad():
        outs = model.forward_intermediates(x, [2, 5, 8])
        assert [o.shape[1] for o in outs] == [16, 32, 64]
        assert torch.allclose(model.forward_head(outs[-1]), model(x))
        again = model.forward_blocks(outs[0], 3, 6)
        assert torch.equal(again, outs[1])
    assert isinstance(models.create("lcnet_resnet20"), GatedResNet)


def test_slice_cache_serves_equal_slices_and_stays_bounded():
    model = randomize(models.create("lcnet_resnet20").eval(), seed=9)
    x = _input(model, 4)
    cache = SliceCache(max_bytes=200 << 10)
    with torch.no_grad():
        masked, _ = model(x)
        assert torch.allclose(model(x, SparsePlan(1.0, 1.0, cache))[0], masked,
                              rtol=1e-4, atol=1e-5)
        assert len(cache) == 0   # not frozen: weights are rebuilt per call, never cached
        for block in model.blocks:
            block.freeze()
        for _ in range(2):  # cold, then warm
            sparse, _ = model(x, SparsePlan(1.0, 1.0, cache))
            assert torch.allclose(sparse, masked, rtol=1e-4, atol=1e-5)
    assert 0 < len(cache)
    assert cache._bytes <= cache.max_bytes
    conv2 = model.blocks[0].inference_block().conv2
    channels = torch.tensor([0, 3, 5])
    channel_key = SliceCache.channel_key(channels)
    assert torch.equal(cache.conv(conv2, 1, channels, channel_key).weight,
                       conv2.weight[:, channels])
    conv1 = model.blocks[0].inference_block().conv1
    cut = cache.conv(conv1, 0, channels, channel_key)
    assert torch.equal(cut.weight, conv1.weight[channels])
    assert torch.equal(cut.bias, conv1.bias[channels])
    key = SliceCache.key(conv2.weight, 1, channel_key)
    with torch.no_grad():
        conv2.weight.add_(1.0)  # a changed weight is a different key: no stale slice
    assert SliceCache.key(conv2.weight, 1, channel_key) != key


@pytest.mark.parametrize("memory_format", [torch.channels_last, torch.contiguous_format])
def test_pooling_by_matmul_equals_the_sum(memory_format):
    from models.lcnet import pooled_sum

    x = torch.randn(3, 64, 9, 7).contiguous(memory_format=memory_format)
    torch.testing.assert_close(pooled_sum(x, by_matmul=True), x.sum((2, 3)))
    torch.testing.assert_close(pooled_sum(x), x.sum((2, 3)))


def test_calibrated_plan_covers_every_block():
    from dynviz import engine
    model = models.create("lcnet_resnet8").eval()
    plan = engine.calibrate(model, batch_size=2, repeats=1, fractions=(0.5,))
    assert len(plan.slice_below) == len(plan.slice_below_cached) == len(model.blocks)
    assert len(plan.pool_by_matmul) == len(model.blocks)
    assert all(t in (0.0, 0.5) for t in plan.slice_below + plan.slice_below_cached)
    x = _input(model, 2)
    with torch.no_grad():
        assert torch.allclose(model(x, plan)[0], model(x)[0], rtol=1e-4, atol=1e-5)


def test_folding_batchnorm_keeps_the_function():
    from dynviz import engine
    for name, kw in (("resnet20", {}), ("lcnet_resnet20", {}),
                     ("exits_resnet20", {"head_convs": 2})):
        model = randomize(models.create(name, **kw).eval(), seed=10)
        folded = engine.fold_batchnorm(model)
        x = _input(model, 3)
        with torch.no_grad():
            assert torch.allclose(_logits(folded(x)), _logits(model(x)), rtol=1e-4, atol=1e-5)
        assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())


@pytest.mark.parametrize("name", ["resnet20", "resnet50"])
def test_folded_plain_resnet_runs_frozen_blocks_and_trains_through_modules(name):
    """Folding freezes a plain ResNet's blocks: in eval mode they run as ``FrozenBlock`` raw
    calls (the same function), in training mode through their modules again. (The native
    runner, which runs them from C++, has its tests in test_native.py.)"""
    from dynviz import engine
    model = randomize(models.create(name).eval(), seed=11)
    folded = engine.fold_batchnorm(model, use_native=False)
    x = _input(model, 2)
    calls = []
    for block in folded.blocks:
        frozen = block.__dict__["_frozen"]
        block.__dict__["_frozen"] = lambda h, f=frozen: calls.append(1) or f(h)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-4, atol=1e-4)
    assert len(calls) == len(folded.blocks)
    folded.train().requires_grad_(True)
    folded(x).sum().backward()
    assert len(calls) == len(folded.blocks)   # training did not use them
    assert all(p.grad is not None for p in folded.parameters())


def test_inference_convs_with_large_weights_run_on_onednn(monkeypatch):
    """One small image through a large conv: torch would pick its im2col convolution (input
    under 20480 elements); ``conv2d`` calls oneDNN, with the same result. Small weights, and
    inputs that need gradients, keep torch's choice."""
    from models import resnet
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 256, 7, 7, generator=g).contiguous(memory_format=torch.channels_last)
    w = torch.randn(512, 256, 3, 3, generator=g) * 0.05
    b = torch.randn(512, generator=g)
    calls = []
    original = torch.mkldnn_convolution
    monkeypatch.setattr(torch, "mkldnn_convolution", lambda *a: calls.append(1) or original(*a))
    with torch.no_grad():
        got = resnet.conv2d(x, w, b, (1, 1), (1, 1), (1, 1), 1)
        small = resnet.conv2d(x[:, :16], w[:16, :16], b[:16], (1, 1), (1, 1), (1, 1), 1)
    torch.testing.assert_close(got, torch.nn.functional.conv2d(x, w, b, 1, 1),
                               rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(small, torch.nn.functional.conv2d(x[:, :16], w[:16, :16],
                                                                 b[:16], 1, 1))
    assert len(calls) == 1 and w.numel() >= resnet.ONEDNN_MIN_WEIGHT
    resnet.conv2d(x.requires_grad_(True), w, b, (1, 1), (1, 1), (1, 1), 1).sum().backward()
    assert len(calls) == 1 and x.grad is not None
