"""Early exits, cascades, the live AdaptiveClassifier against the policy simulated from the
cache, and the cache format."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import models
from dynviz import cache, data, learn, policy as P
from dynviz.adaptive import EXIT, JUMP, NOT_REACHED, AdaptiveClassifier
from tests.helpers import flops_macs, make_imagefolder, randomize


def _images(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (n, 1, 1, 3))                     # per-image colour cast
    noise = rng.integers(-60, 60, (n, 32, 32, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def _system(name: str, **kw):
    torch.manual_seed(0)                                          # the builders' init
    system = models.create(name, **kw).eval()
    for i, module in enumerate(system.modules()):
        if isinstance(module, torch.nn.Linear):                  # confident, varied heads
            torch.nn.init.normal_(module.weight, std=1.5 / module.in_features**0.5,
                                  generator=torch.Generator().manual_seed(i))
    return randomize(system, seed=11)


def _stage_outputs(system, x) -> P.StageOutputs:
    with torch.no_grad():
        out = system(x)
    logits, macs = out.stage_logits, out.stage_macs
    # a cascade's trace: what its last network costs on its own (a jump's cost)
    jump = out.trace.jump_macs.numpy().astype(float) if system.can_jump else None
    labels = logits[:, -1].argmax(1).numpy()                     # the last stage is "right"
    labels[::7] = (labels[::7] + 1) % 10                          # ... mostly
    return P.StageOutputs(logits.numpy(), labels, macs.numpy().astype(float), jump)


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


def test_cascade_that_always_exits_is_its_first_model():
    system = _system("cascade_r8_r20_r56", members=("resnet8", "resnet8", "resnet20"))
    x = data.to_tensor(_images(6))
    always = P.Policy("constant", "max_prob", "chain", 0.0, (P.ALWAYS, P.ALWAYS))
    with torch.no_grad():
        out = AdaptiveClassifier(system, always)(x)
        logits, trace = out.logits, out.trace
        assert torch.equal(logits, system.stages[0](x).logits)
    assert (trace.exit_stage == 0).all()
    assert (trace.macs == system.stage_macs()[0]).all()
    assert (trace.decisions[:, 1:] == NOT_REACHED).all()


@pytest.mark.parametrize("name, kw, topology", [
    ("exits_resnet20", {}, "chain"),
    ("cascade_r8_r20_r56", {"members": ("resnet8", "resnet8", "resnet20")}, "chain"),
    ("cascade_r8_r20_r56", {"members": ("resnet8", "resnet8", "resnet20")}, "jump"),
])
@pytest.mark.parametrize("family", ["threshold", "linear"])
def test_live_classifier_equals_the_simulation(name, kw, topology, family):
    system = _system(name, **kw)
    x = data.to_tensor(_images(96))
    outputs = _stage_outputs(system, x)
    pol = None
    for lam in (0.03, 0.1, 0.3, 1.0, 3.0, 10.0):                  # a λ with mixed exits
        candidate = learn.fit(outputs, lam, family, topology=topology)
        sim = P.simulate(candidate, outputs)
        if len(np.unique(sim.exit_stage)) > 1:
            pol = candidate
            break
    assert pol is not None, "no λ gave a policy that uses more than one stage"
    with torch.no_grad():
        out = AdaptiveClassifier(system, pol)(x)
    logits, trace = out.logits, out.trace
    assert np.array_equal(trace.exit_stage, sim.exit_stage)
    assert np.array_equal(trace.jumped, sim.jumped)
    assert np.array_equal(logits.argmax(1).numpy(), sim.predictions)
    assert np.allclose(trace.macs, sim.cost)
    # every image leaves exactly once: an exit, or a jump to the last network
    assert (((trace.decisions == EXIT) | (trace.decisions == JUMP)).sum(1) == 1).all()
    # one image at a time (the batch-1 path) takes the same route with the same numbers
    live = AdaptiveClassifier(system, pol)
    for i in range(0, len(x), 7):
        with torch.no_grad():
            one_out = live(x[i:i + 1])
        one_logits, one = one_out.logits, one_out.trace
        # batch 1 and batch 96 may take different conv kernels: equal up to float rounding,
        # relative to the logits' scale (random weights give logits in the hundreds)
        scale = 1e-5 * float(logits[i].abs().max())
        assert torch.allclose(one_logits[0], logits[i], rtol=0, atol=scale)
        assert one.exit_stage[0] == sim.exit_stage[i] and one.jumped[0] == sim.jumped[i]
        assert np.array_equal(one.decisions[0], trace.decisions[i])
        assert np.array_equal(one.stage_macs[0], trace.stage_macs[i])
        assert np.allclose(one.features[0], trace.features[i], equal_nan=True, atol=1e-5)
        assert np.allclose(one.stage_logits[0], trace.stage_logits[i], equal_nan=True,
                           rtol=0, atol=1e-5 * np.nanmax(np.abs(trace.stage_logits[i])))


def test_adaptive_classifier_checks_the_policy_shape():
    system = models.create("exits_resnet20").eval()
    with pytest.raises(ValueError, match="decisions"):
        AdaptiveClassifier(system, P.Policy("constant", "max_prob", "chain", 0.0, (P.ALWAYS,)))


# ---------------------------------------------------------------------------- cache
@pytest.fixture
def tiny_split(tmp_path):
    root = make_imagefolder(tmp_path / "tiny", per_class=3)
    return data.test_split(root)


def test_cache_round_trip_and_staleness(tiny_split, cache_env):
    system = _system("exits_resnet20")
    built = cache.ensure("exits_resnet20", system, tiny_split, "a" * 64, progress=False)
    assert built.arrays["logits"].shape == (30, 3, 10)
    assert isinstance(built.arrays["logits"], np.memmap)
    assert built.ids == tiny_split.ids
    with torch.no_grad():
        out = system(data.to_tensor(tiny_split.images()))
    assert np.allclose(built.arrays["logits"], out.stage_logits.numpy(), atol=1e-5)
    assert np.array_equal(built.arrays["stage_macs"], out.stage_macs.numpy())
    assert np.array_equal(built.arrays["labels"], tiny_split.labels)
    manifest = json.loads((built.directory / "manifest.json").read_text())
    assert manifest["data_fingerprint"] == tiny_split.fingerprint
    assert not list(built.directory.parent.glob(".tmp-*"))
    again = cache.ensure("exits_resnet20", system, tiny_split, "a" * 64, progress=False)
    assert again.directory == built.directory and again.manifest["created"] == manifest["created"]

    def must_not_load():
        raise AssertionError("the model was loaded although its outputs are cached")

    lazily = cache.ensure("exits_resnet20", must_not_load, tiny_split, "a" * 64, progress=False)
    assert lazily.directory == built.directory
    loads = []
    cache.ensure("exits_resnet20", lambda: loads.append(1) or system, tiny_split, "c" * 64,
                 progress=False)
    assert loads == [1]                  # a missing cache loads the model once
    reported = []
    rebuilt = cache.ensure("exits_resnet20", system, tiny_split, "b" * 64, progress=False,
                           on_progress=reported.append)
    assert rebuilt.directory != built.directory and not built.directory.exists()
    assert reported == [1.0]             # 30 images: one batch
    reported.clear()
    cache.compute_outputs(system, tiny_split.images(), device=torch.device("cpu"),
                          batch_size=8, progress=False, on_progress=reported.append)
    assert reported == pytest.approx([8 / 30, 16 / 30, 24 / 30, 1.0])
    out = rebuilt.stage_outputs()
    assert out.n_stages == 3 and len(out) == 30


def test_shipping_a_cache_copies_it_without_recomputing(tiny_split, cache_env, tmp_path):
    local = cache.ensure("resnet8", models.create("resnet8").eval(), tiny_split, "e" * 64,
                         progress=False)

    class MustNotRun(torch.nn.Module):
        def forward(self, x):
            raise AssertionError("the shipped copy was recomputed")

    shipped = cache.ensure("resnet8", MustNotRun(), tiny_split, "e" * 64, progress=False,
                           root=tmp_path / "assets")
    assert shipped.directory.parent == tmp_path / "assets"
    assert shipped.manifest == local.manifest
    for name, array in local.arrays.items():
        assert np.array_equal(shipped.arrays[name], array)


def test_cache_of_a_gated_model_keeps_its_gates(tiny_split, cache_env):
    model = randomize(models.create("lcnet_resnet8").eval(), seed=12)
    cached = cache.ensure("lcnet_resnet8", model, tiny_split, "c" * 64, progress=False)
    with torch.no_grad():
        trace = model(data.to_tensor(tiny_split.images())).trace
    assert np.abs(cached.block_scores() - trace.block_scores.numpy()).max() <= 0.5 / 255 + 1e-6
    for b in range(len(model.blocks)):
        assert np.abs(cached.channel_scores(b) - trace.channel_scores[b].numpy()).max() \
            <= 0.5 / 255 + 1e-6
    assert np.array_equal(cached.arrays["stage_macs"][:, 0], trace.macs.numpy())


def test_halves_need_the_val_split(tiny_split, cache_env):
    cached = cache.ensure("resnet8", models.create("resnet8").eval(), tiny_split, "d" * 64,
                          progress=False)
    with pytest.raises(ValueError, match="val"):
        cached.half("fit")


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
