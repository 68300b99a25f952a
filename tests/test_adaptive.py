"""The live AdaptiveClassifier against the policy simulated from cached outputs: the same
exits, jumps, answers and MACs, at batch 1 and in batches."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import models
from dynviz import learn, policy as P
from dynviz.adaptive import EXIT, JUMP, AdaptiveClassifier
from tests.helpers import colour_images, confident_system, stage_outputs_of


@pytest.mark.parametrize("name, kw, topology", [
    ("exits_resnet20", {}, "chain"),
    ("cascade_r8_r20_r56", {"members": ("resnet8", "resnet8", "resnet20")}, "chain"),
    ("cascade_r8_r20_r56", {"members": ("resnet8", "resnet8", "resnet20")}, "jump"),
])
@pytest.mark.parametrize("family", ["threshold", "linear"])
def test_live_classifier_equals_the_simulation(name, kw, topology, family, ws):
    system = confident_system(name, **kw)
    x = ws.data.to_tensor(colour_images(96))
    outputs = stage_outputs_of(system, x)
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


def test_a_chain_cascade_of_the_workspace_takes_no_jump_policy(tmp_path):
    """A cascade whose dynviz.toml says topology = "chain" cannot send an image straight to
    its last network: a policy with jumps is refused; the jump topology takes it."""
    from dynviz import workspace, zoo
    from tests.helpers import workspace_toml, write_random_checkpoints

    systems = {"a": {"kind": "static", "model": "resnet8", "checkpoint": "a"},
               "b": {"kind": "static", "model": "resnet8", "checkpoint": "b"},
               "c": {"kind": "static", "model": "resnet8", "checkpoint": "c"}}
    jumping = P.Policy("constant", "max_prob", "jump", 0.0, (P.NEVER, P.NEVER),
                       (P.ALWAYS, P.NEVER))
    for topology, refused in (("chain", True), ("jump", False)):
        root = tmp_path / topology
        root.mkdir()
        (root / "dynviz.toml").write_text(workspace_toml(
            [str(i) for i in range(10)], 32, systems | {"abc": {
                "kind": "cascade", "members": ["a", "b", "c"], "topology": topology}},
            reference="c"))
        write_random_checkpoints(root / "checkpoints", {"a": "resnet8", "b": "resnet8",
                                                        "c": "resnet8"})
        cascade = zoo.load_system(workspace.load(root), "abc", torch.device("cpu"))
        if refused:
            with pytest.raises(ValueError, match="a jump policy needs a cascade of the jump "
                                                 "topology"):
                AdaptiveClassifier(cascade, jumping)
        else:
            AdaptiveClassifier(cascade, jumping)
