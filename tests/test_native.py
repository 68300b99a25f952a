"""The native block runner (models/csrc/blocks.cpp) against the Python paths it replaces:
folded plain blocks, the gated sparse path at batch 1 and in batches (with its slicing and
its store of recurring cuts), and static cuts."""
from __future__ import annotations

import copy
import pickle
import shutil
import threading

import pytest
import torch
import torch.nn as nn

import models
from dynviz import runtime, settings
from dynviz.bench import gated as gated_bench
from dynviz.runtime import native as native_bridge
from dynviz.runtime.folded import FoldedBlock
from dynviz.runtime.slices import SliceCache
from dynviz.runtime.sparse import FoldedGatedBlock, SparsePlan
from tests.helpers import model_input, randomize

pytestmark = pytest.mark.native


@pytest.fixture(scope="module")
def runner_module():
    module = native_bridge.module() if settings.native_enabled() else None
    if module is None:
        if shutil.which("c++") or shutil.which("g++"):
            if settings.native_enabled():
                pytest.fail("a C++ compiler is here but the native runner did not build")
        pytest.skip("no native block runner on this machine (no compiler or DYNVIZ_NATIVE=0)")
    return module


def _fold_both(model: nn.Module, channels_last: bool = True):
    """``model`` folded twice in the layout asked for: its blocks run from Python, and from
    the native runner."""
    model = model.to(memory_format=torch.channels_last if channels_last
                     else torch.contiguous_format)
    python = runtime.fold(model, use_native=False)
    native = runtime.fold(model, use_native=True)
    assert native.native is not None and python.native is None
    return python, native


def _refuse(*args, **kwargs):
    raise AssertionError("a Python block path ran")


def _no_python_blocks(monkeypatch):
    """Make the Python block paths raise: whatever still runs, runs natively."""
    monkeypatch.setattr(FoldedBlock, "__call__", _refuse)
    monkeypatch.setattr(FoldedGatedBlock, "run", _refuse)


@pytest.mark.parametrize("name,size", [("resnet20", 32), ("resnet18", 64), ("resnet50", 64)])
def test_native_plain_blocks_compute_the_folded_python_blocks(runner_module, name, size,
                                                             monkeypatch):
    model = randomize(models.create(name).eval(), seed=20)
    python, native = _fold_both(model)
    for batch in (1, 3):
        x = model_input(model, batch, size, seed=batch).contiguous(
            memory_format=torch.channels_last)
        with torch.no_grad():
            expected = python(x).logits
            with monkeypatch.context() as m:
                _no_python_blocks(m)
                got = native(x).logits
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        with torch.no_grad():   # and the runs of blocks an early-exit system reads
            a = b = python.forward_stem(x)
            for start, stop in ((0, 3), (3, 6)):
                a, b = native.forward_blocks(a, start, stop), python.forward_blocks(b, start, stop)
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_native_blocks_leave_autograd_to_the_python_blocks(runner_module):
    model = randomize(models.create("resnet20").eval(), seed=21)
    _, native = _fold_both(model)

    class Refuse:
        def plain(self, *args):
            raise AssertionError("the native runner ran")
    native.native = Refuse()
    x = model_input(model, 2)
    with torch.no_grad(), pytest.raises(AssertionError, match="native runner ran"):
        native(x)                       # inference: the runner
    x.requires_grad_(True)
    native(x).logits.sum().backward()   # autograd: the Python blocks run
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_copies_and_pickles_of_a_native_model_run_python_blocks(runner_module):
    model = randomize(models.create("resnet20").eval(), seed=22)
    _, native = _fold_both(model)
    x = model_input(model, 1).contiguous(memory_format=torch.channels_last)
    for twin in (copy.deepcopy(native), pickle.loads(pickle.dumps(native))):
        assert twin.native is None
        with torch.no_grad():
            torch.testing.assert_close(twin(x).logits, native(x).logits, rtol=1e-5, atol=1e-5)


def _partly_off(trace) -> list[tuple[int, int]]:
    """(block, channels) of every block the images that run it run with some but not all of
    its channels: the union of their active channels, which the sparse path may slice to."""
    cut = []
    for i, s_c in enumerate(trace.channel_scores):
        union = (s_c[trace.blocks_executed[:, i]] > 0).any(0)
        if union.any() and not union.all():
            cut.append((i, int(union.sum())))
    return cut


def _fresh_runner(native) -> None:
    """A new runner for ``native``: an empty store of cuts."""
    native.native = native.native_runner()


@pytest.mark.parametrize("batch", [1, 4])
def test_native_runner_keeps_the_cuts_of_recurring_channel_sets(runner_module, batch,
                                                                monkeypatch):
    """A plan that slices recurring channel sets only: the first time a set is met the runner
    computes every channel and keeps nothing; from the second time on it computes only that
    set, from a cut it keeps, one per block whose (union) set is partly off, of that set's
    size, a downsampling block among them. No Python block runs, the logits stay the masked
    path's, and a store too small for a cut keeps none."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = randomize(models.create("lcnet_resnet20").eval(), seed=28)
    down = next(i for i, b in enumerate(model.blocks) if b.downsample is not None)
    _force_gates(model, down, 1.0, 0.0)   # run by every image,
    with torch.no_grad():                 # half of its channels off
        gate = model.blocks[down].channel_gate.fc
        gate.bias.copy_(torch.arange(gate.out_features) % 2)
    python, native = _fold_both(model)
    x = model_input(model, batch, seed=6) + 2 * model_input(model, batch, 1, seed=7)
    x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        out = model(x)
        masked, trace = out.logits, out.trace
        expected = _partly_off(trace)
        assert (down, model.blocks[down].mid_channels // 2) in expected
        _no_python_blocks(monkeypatch)
        for plan, kept in ((SparsePlan(0.0, 1.0, SliceCache(1)), [[], [], []]),
                           (SparsePlan(0.0, 1.0, SliceCache(64 << 20)),
                            [[], expected, expected])):
            _fresh_runner(native)
            runner = native.native
            for after in kept:
                got = native(x.clone(), plan).logits
                assert (got - masked).norm() / masked.norm() <= 1e-4
                assert sorted(runner.slices()) == after


def _force_gates(model: nn.Module, block: int, s_l: float | None,
                 s_c: float | None = None) -> None:
    """Every image's S_L and S_C of ``block`` set to a constant (None: left as they are)."""
    b = model.blocks[block]
    with torch.no_grad():
        for gate, value in ((b.block_gate, s_l), (b.channel_gate, s_c)):
            if value is not None:
                gate.fc.weight.zero_()
                gate.fc.bias.fill_(value)


def _native_sparse_paths_agree(model, python, native, x, monkeypatch):
    """Runs the sparse path of ``native`` on ``x`` (the Python block paths made to raise)
    with a plan that never slices and, twice, one that always does, and holds each run to
    the Python sparse path (logits, scores) and the masked one (logits, MACs). Returns the
    masked trace and the (block, channels) cuts the runner kept: none after the first time
    (every set met once), the recurring ones after the second."""
    with torch.no_grad():
        out = model(x)
        masked, t_masked = out.logits, out.trace
        out = python(x.clone(), SparsePlan(0.0))
        expected, t_py = out.logits, out.trace
        _fresh_runner(native)
        runner = native.native
        runs = []
        with monkeypatch.context() as m:
            _no_python_blocks(m)
            runs.append(native(x.clone(), SparsePlan(0.0)))
            always = SparsePlan(1.0, 1.0, SliceCache(64 << 20))
            runs.append(native(x.clone(), always))        # fresh cuts, none kept
            assert runner.slices() == []
            runs.append(native(x.clone(), always))
    for logits, trace in ((out.logits, out.trace) for out in runs):
        assert (logits - expected).norm() / expected.norm() <= 1e-5
        assert (logits - masked).norm() / masked.norm() <= 1e-4
        for a, b in zip(trace.scores, t_py.scores):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
        assert torch.equal(trace.macs, t_masked.macs)
    return t_masked, sorted(runner.slices())


@pytest.mark.parametrize("placement", ["parallel", "sequential"])
@pytest.mark.parametrize("name", ["lcnet_resnet20", "lcnet_resnet50"])
def test_native_sparse_path_equals_the_python_one_and_the_masked_one(runner_module, name,
                                                                      placement, monkeypatch):
    """Random gate patterns (blocks skipped, channels off, scores in (0, 1)) and blocks run
    with no channel on, batch 1: the same logits, scores and MACs, whether the runner never
    slices or always does, when it cuts exactly the blocks run with some (not all) channels
    off, to their active channels."""
    size = 32 if name == "lcnet_resnet20" else 64
    model = randomize(models.create(name, placement=placement, input_size=size).eval(), seed=23)
    down = [i for i, b in enumerate(model.blocks) if b.downsample is not None]
    for i in (1, down[-1]):
        _force_gates(model, i, 1.0, -1.0)         # run with no channel: conv2's bias
    python, native = _fold_both(model)
    cut = skipped = 0
    for seed in range(4):
        x = model_input(model, 1, size, seed=seed).contiguous(memory_format=torch.channels_last)
        t_masked, kept = _native_sparse_paths_agree(model, python, native, x, monkeypatch)
        assert kept == _partly_off(t_masked)
        cut += len(kept)
        skipped += int((~t_masked.blocks_executed).sum())
    assert cut > 0 and skipped > 0


def test_native_gates_take_any_memory_layout(runner_module):
    """Channels-last inputs of CIFAR widths take the fused gate loop; contiguous ones the
    library's reduction and product: both give the masked path's scores."""
    model = randomize(models.create("lcnet_resnet20").eval(), seed=24)
    for channels_last in (True, False):
        python, native = _fold_both(model, channels_last)
        x = model_input(model, 1, seed=3)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            out = model(x)
            masked, t_masked = out.logits, out.trace
            out = native(x.clone(), SparsePlan(0.0))
            sparse, t_native = out.logits, out.trace
            h = native.forward_stem(x)
            scores, fused = native.native.block_gates(h, 0)
        assert fused == channels_last
        torch.testing.assert_close(scores, t_masked.scores[0], rtol=0, atol=1e-5)
        torch.testing.assert_close(sparse, masked, rtol=1e-4, atol=1e-5)
        for a, b in zip(t_native.scores, t_masked.scores):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("name", ["lcnet_resnet20", "lcnet_resnet50"])
def test_native_sparse_batches_equal_the_python_ones(runner_module, name, channels_last,
                                                     monkeypatch):
    """Batches run natively too: images that skip a block leave its sub-batch and the rest
    are merged back. Blocks that every image runs (all S_C = 1) or skips, downsampling ones
    among them, and blocks some images run give the Python path's logits, scores and MACs in
    either memory layout, never slicing or always: then the runner cuts exactly the blocks
    whose sub-batch leaves some channel off in every image, to the union of the others."""
    with torch.random.fork_rng(devices=[]):          # conv weights too: the patterns
        torch.manual_seed(0)                         # asserted below depend on them
        size = 32 if name == "lcnet_resnet20" else 64
        model = randomize(models.create(name, input_size=size).eval(), seed=22)
    down = [i for i, b in enumerate(model.blocks) if b.downsample is not None]
    every, none = (down[0], down[0] + 1), (down[-1] + 1, down[2] if len(down) > 2 else -1)
    for i in every:
        _force_gates(model, i, 1.0, 1.0)          # every image, every channel at 1
    for i in none:
        _force_gates(model, i, -1.0)              # no image
    empty = (down[1], down[0] + 2)
    for i in empty:
        _force_gates(model, i, None, -1.0)        # no channel, in the images that run it
    python, native = _fold_both(model, channels_last)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = model_input(model, 6, seed=4) + 2 * model_input(model, 6, 1, seed=5)  # a colour per image:
    x = x.contiguous(memory_format=fmt)                     # the gates differ between them
    t_masked, kept = _native_sparse_paths_agree(model, python, native, x, monkeypatch)
    runs = t_masked.blocks_executed.sum(0).tolist()       # images per block
    assert [runs[i] for i in every] == [6, 6] and [runs[i] for i in none] == [0, 0]
    assert all(runs[i] > 0 for i in empty)
    assert any(0 < runs[i] < 6 for i in down) and \
        any(0 < n < 6 for i, n in enumerate(runs) if i not in down)
    assert kept == _partly_off(t_masked) and kept


@pytest.mark.parametrize("placement", ["parallel", "sequential"])
def test_native_static_cut_equals_the_python_static_cut(runner_module, placement):
    model = randomize(models.create("lcnet_resnet20", placement=placement).eval(), seed=26)
    python, native = _fold_both(model)
    for seed in range(3):
        x = model_input(model, 1, seed=seed).contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            out = model(x)
            masked, trace = out.logits, out.trace
            expected = gated_bench.static_cut(python, trace.scores)(x)
            got = gated_bench.static_cut(native, trace.scores)(x)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
        assert (got - masked).norm() / masked.norm() <= 1e-4


def test_native_runner_can_be_turned_off(runner_module, monkeypatch):
    monkeypatch.setenv("DYNVIZ_NATIVE", "0")
    assert native_bridge.module() is None
    folded = runtime.fold(models.create("resnet8").eval())
    assert folded.native is None
    with pytest.raises(RuntimeError, match="not available"):
        runtime.fold(models.create("resnet8").eval(), use_native=True)


def test_native_runner_checks_its_arguments(runner_module):
    model = models.create("lcnet_resnet8").eval()
    folded = runtime.fold(model, use_native=True)
    runner = folded.native
    x = torch.randn(2, 16, 32, 32)
    with pytest.raises(RuntimeError, match="one limit per block"):
        runner.gated(x, 0, 1, [0.0], [0.0], 0)
    with pytest.raises(RuntimeError, match="out of range"):
        runner.plain(x, 0, len(folded.blocks) + 1)
    conv = folded.blocks[0].conv1
    with pytest.raises(ValueError, match="square"):
        native_bridge.block_spec(conv._replace(groups=2), conv, None, None)


@pytest.mark.parametrize("shape", [(1, 16, 32, 32), (1, 256, 56, 56), (1, 2048, 7, 7)])
def test_native_merge_is_the_residual_add_and_relu_with_its_sums(runner_module, shape):
    """``merge`` (what ends a block of the gated path at batch 1): relu(identity + s_l·branch)
    over ``branch``, and the output summed over H×W, in either layout (large images split
    by channels between the cores) and when the two layouts differ."""
    runner = runtime.fold(models.create("lcnet_resnet8").eval(), use_native=True).native
    g = torch.Generator().manual_seed(9)
    branch, identity = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    expected = (identity + 0.3 * branch).relu()
    last = torch.channels_last
    dense = torch.contiguous_format
    for b_fmt, i_fmt in ((last, last), (dense, dense), (last, dense)):
        out = branch.contiguous(memory_format=b_fmt).clone(memory_format=b_fmt)
        sums = runner.merge(out, identity.contiguous(memory_format=i_fmt), 0.3)
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)
        torch.testing.assert_close(sums, expected.double().sum((2, 3)).float(),
                                   rtol=1e-5, atol=1e-4)


def test_native_gates_start_from_given_sums(runner_module):
    """``gated(..., sums)`` takes the input's sums over H×W instead of pooling it: the
    scores of its first block follow the given sums, which must have one row per image."""
    model = randomize(models.create("lcnet_resnet20").eval(), seed=25)
    _, native = _fold_both(model)
    runner = native.native
    x = model_input(model, 1, seed=4).contiguous(memory_format=torch.channels_last)
    x = native.forward_stem(x)
    never = [0.0] * len(native.blocks)
    with torch.no_grad():
        _, pooled_scores = runner.gated(x.clone(), 0, 1, never, never, 0)
        _, same = runner.gated(x.clone(), 0, 1, never, never, 0, x.sum((2, 3)))
        _, other = runner.gated(x.clone(), 0, 1, never, never, 0, 0.5 * x.sum((2, 3)))
    torch.testing.assert_close(same[0], pooled_scores[0], rtol=0, atol=1e-6)
    ops = native.blocks[0]
    expected = (0.5 * x.mean((2, 3)) @ ops.gate_weight.T + ops.gate_bias).clamp(0, 1)
    torch.testing.assert_close(other[0], expected, rtol=0, atol=1e-5)
    assert not torch.allclose(other[0], pooled_scores[0], rtol=0, atol=1e-3)
    with pytest.raises(RuntimeError, match="one row"):
        runner.gated(x.clone(), 0, 1, never, never, 0, x.sum((2, 3))[:, :3])


def test_native_calibration_times_the_runner_masked_against_sliced(runner_module,
                                                                    monkeypatch):
    """At batch 1 a native model's calibration runs each block on one-block runners whose
    gates give the measured channel sets; with the store, each keeps the cut of its set, of
    the measured size. No Python block runs, and the plan keeps the sparse path exact."""
    native_runner = native_bridge
    model = randomize(models.create("lcnet_resnet8").eval(), seed=27)
    _, native = _fold_both(model)
    made, build = [], native_runner.blocks
    monkeypatch.setattr(native_runner, "blocks",
                        lambda *a: made.append(build(*a)) or made[-1])
    with monkeypatch.context() as m:
        _no_python_blocks(m)
        m.setattr(type(native.blocks[0]), "branch", _refuse)
        plan = runtime.calibrate(native, 1, repeats=1, fractions=(0.25, 0.5))
    kept = [cut for runner in made for cut in runner.slices()]
    assert kept and all(block == 0 for block, _ in kept)
    assert {n for _, n in kept} <= {round(f * b.mid_channels) for f in (0.25, 0.5)
                                     for b in native.blocks}
    assert all(t in (0.0, 0.25, 0.5) for t in plan.slice_below + plan.slice_below_cached)
    x = model_input(model, 1).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        masked = model(x).logits
        sparse = native(x.clone(), plan).logits
    assert (sparse - masked).norm() / masked.norm() <= 1e-4


def test_native_store_serves_concurrent_callers(runner_module):
    """One runner, threads with different inputs and a store that holds about one cut, so
    that cuts are kept and evicted while others run: each thread gets its serial answer."""
    model = randomize(models.create("lcnet_resnet20").eval(), seed=29)
    _, native = _fold_both(model)
    plan = SparsePlan(1.0, 1.0, SliceCache(40 << 10))
    inputs = [(model_input(model, 1 + i % 2, seed=i)
               + 2 * model_input(model, 1 + i % 2, 1, seed=i + 9))
              .contiguous(memory_format=torch.channels_last) for i in range(8)]
    with torch.no_grad():
        expected = [native(x.clone(), plan).logits for x in inputs]
    results = [None] * len(inputs)

    def work(i):
        with torch.no_grad():
            for _ in range(5):
                results[i] = native(inputs[i].clone(), plan).logits
    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert 0 < len(native.native.slices()) < 8
    for got, ref in zip(results, expected):
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)


def test_threads_of_one_process_build_the_runner_once(monkeypatch, tmp_path):
    """Two first requests at once: one build, one extension for both."""
    import time

    calls = []

    def slow_build(directory):
        calls.append(directory)
        time.sleep(0.2)                   # long enough for the other thread to arrive
        return object()
    monkeypatch.setattr(native_bridge, "_build", slow_build)
    got = [None, None]

    def work(i):
        got[i] = native_bridge.load(tmp_path)
    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and got[0] is got[1] is not None


@pytest.mark.slow
def test_a_build_killed_halfway_does_not_hang_the_next_start(runner_module, tmp_path):
    """A build killed halfway leaves the build directory's lock file behind; the next
    process must not wait on it (torch's lock is the kernel's, released with its holder)."""
    import subprocess
    import sys

    built = native_bridge.build_dir_for(settings.native_dir())
    copy_root = tmp_path / "native"
    shutil.copytree(built, native_bridge.build_dir_for(copy_root))   # keeps the timestamps
    stale = native_bridge.build_dir_for(copy_root) / "lock"
    stale.touch()
    run = subprocess.run(
        [sys.executable, "-c", "from dynviz.runtime import native; m = native.module(); "
                               "print('loaded' if m is not None else 'none')"],
        capture_output=True, text=True, timeout=240, cwd=settings.PROJECT_ROOT,
        env={**__import__("os").environ, "DYNVIZ_NATIVE_DIR": str(copy_root)})
    assert run.stdout.strip() == "loaded", run.stderr[-2000:]
