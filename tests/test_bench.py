"""What the benchmark scripts measure: the gate patterns they impose and the sparsity and MACs
they report (not timings: benchmarks are scripts, these tests check their bookkeeping)."""
from __future__ import annotations

import math

import pytest
import torch

import models
from dynviz import runtime
from dynviz.bench import gated as gated_bench
from dynviz.bench import staged as staged_bench
from dynviz.bench import stages as stages_bench
from tests.helpers import model_input


def _patterned(name: str, blocks_off: float, channels_off: float, same: bool = False):
    model = models.create(name).eval()
    images = gated_bench._inputs(model, 256, seed=1)
    gated_bench.set_gate_pattern(model, images, blocks_off, channels_off, seed=2,
                                 same_channels=same)
    with torch.no_grad():
        trace = model(images).trace
    return model, trace


@pytest.mark.parametrize("blocks_off, channels_off", [(0.5, 0.0), (0.25, 0.5), (0.0, 0.75)])
def test_gate_pattern_switches_off_the_requested_fractions(blocks_off, channels_off):
    model, trace = _patterned("lcnet_resnet20", blocks_off, channels_off)
    ran = trace.blocks_executed
    for i in range(len(model.blocks)):   # exactly the share asked for, block by block
        assert (~ran[:, i]).sum().item() == round(blocks_off * 256)
        off_per_channel = (trace.channel_scores[i] == 0).sum(0)
        assert (off_per_channel == round(channels_off * 256)).all()
    patterns = {tuple(r) for r in ran.tolist()}   # per image: images differ in what ran
    assert len(patterns) > 20 if blocks_off else patterns == {(True,) * len(model.blocks)}


def test_same_channels_gives_every_image_one_set_per_block():
    model, trace = _patterned("lcnet_resnet20", 0.0, 0.5, same=True)
    for i, block in enumerate(model.blocks):
        on = trace.channel_scores[i] > 0
        assert (on == on[0]).all()
        assert on[0].sum().item() == block.mid_channels - round(0.5 * block.mid_channels)


def test_bench_rows_report_the_traced_sparsity_and_macs(ws):
    rows = gated_bench.bench_gated(ws, "lcnet_resnet8", blocks_off=0.5, channels_off=0.25,
                                   batch_sizes=(1, 8), repeats=1, calibrate=False, seed=5)
    # reference: the same weights and pattern, traced here on the images the benchmark times
    torch.manual_seed(5)
    model = models.create("lcnet_resnet8").eval()
    pool = gated_bench._inputs(model, 256, seed=5)
    gated_bench.set_gate_pattern(model, pool, 0.5, 0.25, seed=5)
    with torch.no_grad():
        for row, images in zip(rows, (pool[:32], pool[:8])):
            trace = model(images).trace
            macs = trace.macs.double().mean().item()
            assert row.macs_dense == models.create("resnet8").macs()
            assert row.macs_sparse == round(macs)
            assert row.mac_reduction == pytest.approx(1 - macs / row.macs_dense, abs=1e-4)
            assert row.blocks_off == pytest.approx(
                (~trace.blocks_executed).float().mean().item(), abs=1e-3)
            assert row.speedup == pytest.approx(row.ms_dense / row.ms_sparse, rel=1e-2)
    # a static cut exists for one image, not for a batch of random per-image patterns
    assert rows[0].ms_static > 0 and rows[0].speedup_static > 0
    assert math.isnan(rows[1].ms_static) and math.isnan(rows[1].speedup_static)


def test_bench_times_a_static_cut_of_a_batch_that_shares_one_pattern(ws):
    rows = gated_bench.bench_gated(ws, "lcnet_resnet8", blocks_off=0.0, channels_off=0.5,
                                   same_channels=True, batch_sizes=(8,), repeats=1,
                                   calibrate=False)
    assert rows[0].ms_static > 0 and rows[0].channels_off == 0.5


@pytest.mark.parametrize("placement", ["parallel", "sequential"])
@pytest.mark.parametrize("name", ["lcnet_resnet20", "lcnet_resnet50"])
def test_static_cut_computes_the_gated_model_with_its_macs_less_the_gates(name, placement):
    """The static cut of one image's pattern gives the masked path's logits, and torch's FLOP
    counter over it counts the trace's MACs less the gates' FCs (which it does not run).
    The cut is of the folded model, on Python blocks (the FLOP counter does not see into the
    native runner; tests/test_native.py checks the native cut against this one)."""
    from tests.helpers import flop_counter, randomize

    size = {"input_size": 64} if name == "lcnet_resnet50" else {}   # ImageNet layout at 64²
    model = randomize(models.create(name, placement=placement, **size).eval(), seed=6)
    folded = runtime.fold(model, use_native=False)
    gate_macs = sum(fc.in_features * fc.out_features for block in model.blocks
                    for fc in (block.block_gate.fc, block.channel_gate.fc))
    skipped = partial = 0
    for seed in range(4):
        x = model_input(model, 1, seed=seed)
        with torch.no_grad():
            out = model(x)
            masked, trace = out.logits, out.trace
            cut = gated_bench.static_cut(folded, trace.scores)
            with flop_counter() as counter:
                logits = cut(x)
        assert (logits - masked).norm() / masked.norm() <= 1e-4
        assert counter.get_total_flops() // 2 == trace.macs.item() - gate_macs
        skipped += (~trace.blocks_executed).sum().item()
        partial += sum(((s > 0) & (s < 1)).sum().item() for s in trace.scores)
    assert skipped > 0 and partial > 0   # the patterns skip blocks and scale by S in (0, 1)


def test_static_cut_keeps_a_block_whose_channels_are_all_off():
    from tests.helpers import randomize

    model = randomize(models.create("lcnet_resnet20").eval(), seed=7)
    with torch.no_grad():
        for block in model.blocks:   # every block on at 0.5, every channel off
            block.block_gate.fc.weight.zero_()
            block.block_gate.fc.bias.fill_(0.5)
            block.channel_gate.fc.weight.zero_()
            block.channel_gate.fc.bias.fill_(-1.0)
        x = model_input(model, 1)
        out = model(x)
        masked, trace = out.logits, out.trace
        logits = gated_bench.static_cut(runtime.fold(model, use_native=False), trace.scores)(x)
    assert trace.blocks_executed.all()
    torch.testing.assert_close(logits, masked, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["resnet20", "resnet50"])
def test_network_parts_partition_the_forward_and_its_macs(name):
    """bench stages' parts, run in turn, are the network, and their MACs add up to what
    torch's FLOP counter measures (÷2); the same parts of the folded network (what the bench
    times) compute the same logits."""
    from tests.helpers import flop_counter, randomize

    model = randomize(models.create(name).eval(), seed=8)
    size = model.cfg.input_size
    x = torch.randn(1, 3, size, size)
    with torch.no_grad(), flop_counter() as counter:
        expected = model(x).logits
    for run in (None, runtime.fold(model)):
        parts = stages_bench.network_parts(model, run)
        assert [p[0] for p in parts] == ["stem", *model.layer_names, "head"]
        h = x
        with torch.no_grad():
            for _, _, fn in parts:
                h = fn(h)
        if run is None:
            torch.testing.assert_close(h, expected)
        else:                        # BN folded: equal up to float rounding
            assert (h - expected).norm() / expected.norm() <= 1e-4
        assert sum(macs for _, macs, _ in parts) == counter.get_total_flops() // 2


def test_network_parts_refuse_a_gated_model():
    with pytest.raises(TypeError, match="plain ResNet"):
        stages_bench.network_parts(models.create("lcnet_resnet20"))


def test_bench_gives_both_placements_the_same_weights_and_patterns(ws):
    rows = {placement: gated_bench.bench_gated(ws, "lcnet_resnet8", placement=placement,
                                               blocks_off=0.5, channels_off=0.25,
                                               batch_sizes=(1,), repeats=1, calibrate=False)[0]
            for placement in ("sequential", "parallel")}
    seq, par = rows["sequential"], rows["parallel"]
    # the placements differ in what a gated-off channel saves, not in which are off
    assert (seq.blocks_off, seq.channels_off) == (par.blocks_off, par.channels_off)
    assert seq.channels_off > 0 and par.macs_sparse > seq.macs_sparse


@pytest.mark.parametrize("system", ["exits_resnet56", "cascade_r8_r20_r56"])
def test_staged_bench_groups_images_where_the_batched_system_sends_them(app_env, ws, system):
    from collections import Counter

    import numpy as np

    from dynviz import live

    rows = staged_bench.bench_staged(ws, system, n_images=24, repeats=1)
    # reference: the same 24 images as one batch (the batched routing, not the batch-1 one)
    live_system = live.build(ws, system)               # the shipped ≤0.5% policy, as the bench
    x = ws.data.to_tensor(np.ascontiguousarray(ws.split("check").images()[:24]))
    with torch.no_grad():
        trace = live_system.system(x).trace
    labels = np.array([trace.stage_names[e] + ("+jump" if j else "")
                       for e, j in zip(trace.exit_stage, trace.jumped)])
    dense = live_system.dense.macs()
    assert {r.leaves_at: r.images for r in rows[:-1]} == Counter(labels.tolist())
    for r in rows[:-1]:
        assert r.mac_ratio == pytest.approx(trace.macs[labels == r.leaves_at].mean() / dense,
                                            abs=5e-4)
    assert (rows[-1].leaves_at, rows[-1].images) == ("all", 24)
    assert rows[-1].mac_ratio == pytest.approx(trace.macs.mean() / dense, abs=5e-4)


def test_staged_bench_refuses_a_system_that_is_not_staged(app_env, ws):
    with pytest.raises(ValueError, match="not a staged system"):
        staged_bench.bench_staged(ws, "resnet20")


@pytest.mark.parametrize("system, route", [("exits_resnet56", "shipped"),
                                           ("exits_resnet56", "to the end"),
                                           ("cascade_r8_r20_r56", "shipped"),
                                           ("cascade_r8_r20_r56", "jump")])
def test_staged_bench_replays_exactly_the_stages_each_image_ran(app_env, ws, system, route):
    import numpy as np

    from dynviz import live
    from dynviz import policy as P

    k = 6 if system.startswith("exits") else 3
    policy = {"shipped": None,
              "to the end": P.Policy("constant", "max_prob", "chain", 0.0, (P.NEVER,) * (k - 1)),
              "jump": P.Policy("constant", "max_prob", "jump", 0.0, (P.NEVER,) * (k - 1),
                               (P.ALWAYS,) + (P.NEVER,) * (k - 2))}[route]
    live_system = live.build(ws, system, policy)
    model = live_system.system.system         # the folded stages under the policy
    images = ws.split("check").images()[:12]
    for i in range(len(images)):
        x = ws.data.to_tensor(np.ascontiguousarray(images[i:i + 1]))
        with torch.no_grad():
            trace = live_system.system(x).trace
        ran, run_stage = [], model.run_stage
        model.run_stage = lambda k, state: ran.append(k) or run_stage(k, state)
        try:
            with torch.no_grad():
                staged_bench._replay(model, x, trace.decisions[0], bool(trace.jumped[0]))
        finally:
            del model.run_stage
        # reference: the stages the trace charged MACs to, in order
        assert ran == np.flatnonzero(trace.stage_macs[0] > 0).tolist()
