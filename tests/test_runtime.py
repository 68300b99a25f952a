"""The inference runtime against the paper's models: folded networks compute what the
models compute, the sparse path gives the masked path's logits and spends exactly the traced
MACs, the calibration covers every block, and one folded model serves concurrent callers."""
from __future__ import annotations

import threading

import pytest
import torch
import torch.nn as nn

import models
from dynviz import runtime
from dynviz.runtime import folded as F
from dynviz.runtime.slices import SliceCache
from dynviz.runtime.sparse import SparsePlan, pooled_sum
from tests.helpers import flops_macs, model_input, randomize

GATED = [n for n in models.names() if n.startswith("lcnet_")]
SMALL_GATED = [n for n in GATED if n in ("lcnet_resnet8", "lcnet_resnet20", "lcnet_resnet18",
                                         "lcnet_resnet50")]


def gated(name: str, seed: int, **overrides) -> nn.Module:
    """A gated model with random weights and gates, in eval mode; ImageNet-layout ones for
    64×64 inputs (what ``model_input`` gives them), as they are folded for their size."""
    size = 64 if name.removeprefix("lcnet_") in ("resnet18", "resnet34", "resnet50") else 32
    return randomize(models.create(name, input_size=size, **overrides).eval(), seed=seed)


def sparse(model: nn.Module) -> runtime.FoldedGatedResNet:
    """``model`` folded, its blocks run from Python (test_native.py holds the native runner
    to these)."""
    return runtime.fold(model, use_native=False)


@pytest.mark.parametrize("placement", ["parallel", "sequential"])
@pytest.mark.parametrize("name", SMALL_GATED)
def test_sparse_path_spends_exactly_the_traced_macs(name, placement):
    """Batch 1: FlopCounterMode over the sparse executor == the trace's MACs (gates,
    shortcut, executed blocks and channels), for random gate patterns."""
    model = gated(name, seed=1, placement=placement)
    skipped = 0
    for seed in range(4):
        x = model_input(model, 1, seed=seed)
        folded = sparse(model)
        with torch.no_grad():
            counted = flops_macs(lambda: folded(x, SparsePlan(1.0)))
            trace = folded(x, SparsePlan(1.0)).trace
        assert trace.macs.item() == counted
        skipped += (~trace.blocks_executed).sum().item()
    assert skipped > 0  # the patterns do skip blocks


@pytest.mark.parametrize("placement", ["parallel", "sequential"])
@pytest.mark.parametrize("name", GATED)
def test_sparse_equals_masked(name, placement):
    model = gated(name, seed=4, placement=placement)
    size = model.cfg.input_size
    folded = sparse(model)
    for batch, slice_below, by_matmul in ((1, 1.0, False), (1, 0.0, True), (6, 1.0, True),
                                          (6, 0.0, False), (6, 0.5, False)):
        x = model_input(model, batch, size, seed=batch).contiguous(
            memory_format=torch.channels_last)
        with torch.no_grad():
            out = model(x)
            masked, t_masked = out.logits, out.trace
            out = folded(x, SparsePlan(slice_below, pool_by_matmul=by_matmul))
            fast, t_sparse = out.logits, out.trace
        rel = (fast - masked).norm() / masked.norm()
        assert rel <= 1e-4, (batch, slice_below, rel)
        assert torch.allclose(t_masked.block_scores, t_sparse.block_scores, atol=1e-5)
        assert torch.equal(t_masked.blocks_executed, t_sparse.blocks_executed)
        assert torch.equal(t_masked.macs, t_sparse.macs)


def test_sparse_handles_all_skipped_and_all_channels_off():
    model = randomize(models.create("lcnet_resnet20").eval(), seed=5)
    x = model_input(model, 3)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear) and m.out_features == 1:   # L-Net: all blocks open
                m.weight.zero_()
                m.bias.fill_(0.7)
            elif isinstance(m, nn.Linear) and m is not model.fc:  # C-Net: all channels off
                m.weight.zero_()
                m.bias.fill_(-1.0)
        out = sparse(model)(x, SparsePlan(1.0))
        assert torch.allclose(out.logits, model(x).logits, rtol=1e-5, atol=1e-6)
        for m in model.modules():  # now every block skips
            if isinstance(m, nn.Linear) and m.out_features == 1:
                m.bias.fill_(-1.0)
        out = sparse(model)(x, SparsePlan(1.0))
        assert torch.allclose(out.logits, model(x).logits, rtol=1e-5, atol=1e-6)
        assert not out.trace.blocks_executed.any()


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
        folded = sparse(model)
        for plan in (SparsePlan(0.0), SparsePlan(1.0, 1.0, SliceCache(0)),
                     SparsePlan(1.0, 1.0, SliceCache(64 << 20))):   # masks, slices, cached
            for seed in range(3):   # the set recurs from the second image on
                x = model_input(model, 1, seed=seed)
                masked = model(x)
                got = folded(x, plan).logits
                assert set(torch.cat(masked.trace.channel_scores, 1).unique().tolist()) == \
                    {0.0, 1.0}
                torch.testing.assert_close(got, masked.logits, rtol=1e-4, atol=1e-5)


def test_folding_takes_the_eval_mode_function_and_leaves_the_model_as_it_is():
    """A model in training mode folds with its BatchNorm running statistics (eval mode), the
    folded copy has nothing to train, and the source model keeps its mode and weights."""
    model = randomize(models.create("lcnet_resnet8"), seed=13).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folded = sparse(model)
    assert model.training and all(torch.equal(v, model.state_dict()[k])
                                  for k, v in before.items())
    assert not any(p.requires_grad for p in folded.parameters())
    x = model_input(model, 2)
    with torch.no_grad():
        torch.testing.assert_close(folded(x).logits, model.eval()(x).logits,
                                   rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="folded for 32×32"):
        folded(model_input(model, 1, size=40))


def test_one_model_serves_concurrent_callers():
    """No per-call state on the module: threads with different inputs get their own answers."""
    model = sparse(randomize(models.create("lcnet_resnet20").eval(), seed=7))
    model.plans[1] = SparsePlan(0.5, 0.5, SliceCache())
    inputs = [model_input(model.dense, 1 + i % 3, seed=i) for i in range(8)]
    with torch.no_grad():
        expected = [model(x) for x in inputs]
    results = [None] * len(inputs)

    def work(i):
        with torch.no_grad():
            results[i] = model(inputs[i])
    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for out, ref in zip(results, expected):
        assert torch.equal(out.logits, ref.logits) and torch.equal(out.macs, ref.macs)


def test_slice_cache_serves_equal_slices_and_stays_bounded():
    model = randomize(models.create("lcnet_resnet20").eval(), seed=9)
    x = model_input(model, 4)
    cache = SliceCache(max_bytes=200 << 10)
    folded = sparse(model)
    with torch.no_grad():
        masked = model(x).logits
        for _ in range(2):  # cold, then warm
            got = folded(x, SparsePlan(1.0, 1.0, cache)).logits
            assert torch.allclose(got, masked, rtol=1e-4, atol=1e-5)
    assert 0 < len(cache)
    assert cache._bytes <= cache.max_bytes
    conv2 = folded.blocks[0].conv2
    channels = torch.tensor([0, 3, 5])
    channel_key = SliceCache.channel_key(channels)
    assert torch.equal(cache.conv(conv2, 1, channels, channel_key).weight,
                       conv2.weight[:, channels])
    conv1 = folded.blocks[0].conv1
    cut = cache.conv(conv1, 0, channels, channel_key)
    assert torch.equal(cut.weight, conv1.weight[channels])
    assert torch.equal(cut.bias, conv1.bias[channels])
    key = SliceCache.key(conv2.weight, 1, channel_key)
    with torch.no_grad():
        conv2.weight.add_(1.0)  # a changed weight is a different key: no stale slice
    assert SliceCache.key(conv2.weight, 1, channel_key) != key


@pytest.mark.parametrize("memory_format", [torch.channels_last, torch.contiguous_format])
def test_pooling_by_matmul_equals_the_sum(memory_format):
    x = torch.randn(3, 64, 9, 7).contiguous(memory_format=memory_format)
    torch.testing.assert_close(pooled_sum(x, by_matmul=True), x.sum((2, 3)))
    torch.testing.assert_close(pooled_sum(x), x.sum((2, 3)))


def test_calibrated_plan_covers_every_block():
    model = models.create("lcnet_resnet8").eval()
    folded = sparse(model)
    plan = runtime.calibrate(folded, batch_size=2, repeats=1, fractions=(0.5,))
    assert len(plan.slice_below) == len(plan.slice_below_cached) == len(model.blocks)
    assert len(plan.pool_by_matmul) == len(model.blocks)
    assert all(t in (0.0, 0.5) for t in plan.slice_below + plan.slice_below_cached)
    x = model_input(model, 2)
    with torch.no_grad():
        assert torch.allclose(folded(x, plan).logits, model(x).logits, rtol=1e-4, atol=1e-5)
    assert runtime.calibrate_all(folded, (1, 3), repeats=1, fractions=(0.5,)) is folded
    assert sorted(folded.plans) == [1, 3] and folded.plan_for(2) is folded.plans[1]


@pytest.mark.parametrize("fold", [runtime.fold, runtime.fuse_batchnorm])
def test_folding_batchnorm_keeps_the_function(fold):
    for name, kw in (("resnet20", {}), ("lcnet_resnet20", {}),
                     ("exits_resnet20", {"head_convs": 2}), ("cascade_r8_r20_r56", {})):
        model = randomize(models.create(name, **kw).eval(), seed=10)
        folded = fold(model)
        x = model_input(model, 3)
        with torch.no_grad():
            want, got = model(x), folded(x)
            torch.testing.assert_close(got.stage_logits, want.stage_logits, rtol=1e-4,
                                       atol=1e-4)
            assert torch.equal(got.stage_macs, want.stage_macs)
        assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
        if fold is runtime.fold:
            assert folded.dense_counterpart().macs() == model.dense_counterpart().macs()


@pytest.mark.parametrize("name", ["resnet20", "resnet50"])
def test_folded_plain_resnet_runs_its_folded_blocks(name):
    """A folded plain ResNet runs every block as a ``FoldedBlock`` raw call (the same
    function as the module). (The native runner, which runs them from C++, has its tests
    in test_native.py.)"""
    model = randomize(models.create(name).eval(), seed=11)
    folded = runtime.fold(model, use_native=False)
    x = model_input(model, 2)
    calls = []
    folded.blocks = [lambda h, f=block: calls.append(1) or f(h) for block in folded.blocks]
    with torch.no_grad():
        torch.testing.assert_close(folded(x).logits, model(x).logits, rtol=1e-4, atol=1e-4)
    assert len(calls) == len(model.blocks)


def test_inference_convs_with_large_weights_run_on_onednn(monkeypatch):
    """One small image through a large conv: torch would pick its im2col convolution (input
    under 20480 elements); ``conv2d`` calls oneDNN, with the same result. Small weights, and
    inputs that need gradients, keep torch's choice."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 256, 7, 7, generator=g).contiguous(memory_format=torch.channels_last)
    w = torch.randn(512, 256, 3, 3, generator=g) * 0.05
    b = torch.randn(512, generator=g)
    calls = []
    original = torch.mkldnn_convolution
    monkeypatch.setattr(torch, "mkldnn_convolution", lambda *a: calls.append(1) or original(*a))
    with torch.no_grad():
        got = F.conv2d(x, w, b, (1, 1), (1, 1), (1, 1), 1)
        small = F.conv2d(x[:, :16], w[:16, :16], b[:16], (1, 1), (1, 1), (1, 1), 1)
    torch.testing.assert_close(got, torch.nn.functional.conv2d(x, w, b, 1, 1),
                               rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(small, torch.nn.functional.conv2d(x[:, :16], w[:16, :16],
                                                                 b[:16], 1, 1))
    assert len(calls) == 1 and w.numel() >= F.ONEDNN_MIN_WEIGHT
    F.conv2d(x.requires_grad_(True), w, b, (1, 1), (1, 1), (1, 1), 1).sum().backward()
    assert len(calls) == 1 and x.grad is not None


def test_a_folded_model_is_not_moved_or_cast_and_copies_with_its_plans():
    """Its blocks are raw tensors, not parameters: ``.to()`` would move the classifier alone,
    so it refuses. A copy (deepcopy or pickle) of a calibrated one keeps its plans, with an
    empty store of slices of its own, and computes the same answers."""
    import copy
    import pickle

    model = randomize(models.create("lcnet_resnet8").eval(), seed=14)
    folded = sparse(model)
    folded.plans[1] = SparsePlan(0.5, 1.0, SliceCache(1 << 20))
    x = model_input(model, 1)
    with torch.no_grad():
        folded(x)                                  # the store now holds the sets seen
    for cast in (lambda m: m.to(torch.float64), lambda m: m.double(), lambda m: m.cpu()):
        with pytest.raises(TypeError, match="fold the model on the device"):
            cast(folded)
    for twin in (copy.deepcopy(folded), pickle.loads(pickle.dumps(folded))):
        assert (twin.plans[1].slice_below, twin.plans[1].slice_below_cached) == (0.5, 1.0)
        assert len(twin.plans[1].cache) == 0 and twin.plans[1].cache is not folded.plans[1].cache
        with torch.no_grad():
            torch.testing.assert_close(twin(x).logits, folded(x).logits)


def test_a_plan_gives_each_block_its_own_limits():
    plan = SparsePlan((0.25, 0.5), (0.75, 1.0), None, (True, False))
    assert [plan.block(i).slice_below for i in (0, 1)] == [0.25, 0.5]
    assert [plan.block(i).slice_below_cached for i in (0, 1)] == [0.75, 1.0]
    assert [plan.block(i).pool_by_matmul for i in (0, 1)] == [True, False]
    assert plan.native_limits(2) == ([0.25, 0.5], [0.75, 1.0], 0)
    same = SparsePlan(0.5, cache=SliceCache(123))
    assert same.native_limits(3) == ([0.5] * 3, [0.5] * 3, 123)
    with pytest.raises(ValueError, match="different lengths"):
        SparsePlan((0.5,), (0.5, 0.5))


def test_round_robin_runs_each_function_once_per_round():
    calls = []
    times = runtime.round_robin_times({"a": lambda: calls.append("a"),
                                      "b": lambda: calls.append("b")}, repeats=3, warmup=2)
    assert calls == ["a", "a", "b", "b"] + ["a", "b"] * 3
    assert [len(t) for t in times.values()] == [3, 3]


def test_paired_ratio_is_the_median_of_per_round_ratios():
    # a load burst slows the sparse run of rounds 2-4 and the dense run of rounds 4-5: the
    # ratio of medians (2/3) follows the burst, the median of round ratios does not
    dense, sparse = [2.0, 2.0, 2.0, 6.0, 6.0], [1.0, 3.0, 3.0, 3.0, 1.0]
    assert runtime.paired_ratio(dense, sparse) == 2.0
    ratios = sorted(d / s for d, s in zip(dense, sparse))
    assert runtime.paired_ratio(dense, sparse) == ratios[2]
    with pytest.raises(ValueError):
        runtime.paired_ratio([1.0], [1.0, 2.0])


def test_glibc_accepts_the_allocator_settings():
    """Both mallopt calls succeed where glibc is the C library (this project's machines):
    without them the batch-1 timings swing with page faults (see runtime.keep_freed_memory)."""
    import platform

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("not glibc")
    assert runtime.keep_freed_memory() is True
