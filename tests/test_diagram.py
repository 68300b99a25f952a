"""The compute-path diagram marks what the trace says: the blocks skipped, the share of
channels computed, the exit taken. References: hand-written paths, the unfolded model run
outside the app, the shipped policy's own exit rule, and the app's page through AppTest."""
from __future__ import annotations

import dataclasses
import json
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import torch

from dynviz import diagram, live, operating_points, zoo
from dynviz import policy as P
from dynviz.adaptive import JUMP, NOT_REACHED
from tests.helpers import run_page, sketch_marks


def _trace(fig, name: str):
    (trace,) = [t for t in fig.data if t.name == name]
    return trace


def _cells(fig, name: str) -> list:
    data = _trace(fig, name).customdata
    return [] if data is None else [list(row) for row in data]


def _drawn(fig) -> tuple[set[str], set[str]]:
    """(blocks drawn as run, blocks drawn skipped): the markers and the shapes."""
    return ({c[0] for c in _cells(fig, "ran")}, {c[0] for c in _cells(fig, "skipped")})


def _shapes(fig, prefix: str) -> set[str]:
    return {s.name.removeprefix(prefix) for s in fig.layout.shapes
            if s.name and s.name.startswith(prefix)}


def test_a_written_path_is_drawn_block_by_block():
    names = ["layer1.0", "layer1.1", "layer2.0", "layer2.1", "layer2.2"]
    scores = np.array([0.9, 0.0, 0.4, 0.0, 1.0])
    channels = [np.array([1, 0, 0, 1.0]), np.ones(4), np.array([0.5, 0, 0, 0]),
                np.ones(8), np.ones(8)]
    fig = diagram.gated(scores, channels, names)
    assert _drawn(fig) == ({"layer1.0", "layer2.0", "layer2.2"}, {"layer1.1", "layer2.1"})
    assert _shapes(fig, "skip:") == {"layer1.1", "layer2.1"}          # an arc over each
    assert _shapes(fig, "ran:") == {"layer1.0", "layer2.0", "layer2.2"}
    ran = {c[0]: c[1:] for c in _cells(fig, "ran")}
    assert ran == {"layer1.0": [0.9, 0.5], "layer2.0": [0.4, 0.25], "layer2.2": [1.0, 1.0]}
    bars = {s.name: s for s in fig.layout.shapes if s.name and s.name.startswith("ran:")}
    assert bars["ran:layer2.0"].y1 == 0.25 and bars["ran:layer2.0"].opacity == 0.4
    # 2 + 1 + 8 of the 12 channels of the blocks that ran
    assert "3 of 5 blocks ran, 2 skipped" in fig.layout.title.text
    assert f"{11 / 28:.0%} of the channels" in fig.layout.title.text
    groups = {a.text for a in fig.layout.annotations}
    assert {"layer1", "layer2"} <= groups


def test_a_static_network_is_a_plain_chain():
    fig = diagram.static(["layer1.0", "layer1.1", "layer2.0"])
    assert _drawn(fig) == ({"layer1.0", "layer1.1", "layer2.0"}, set())
    assert not _shapes(fig, "skip:")
    assert _drawn(diagram.static([])) == ({"network"}, set())   # an exported program


def test_a_written_path_is_sketched_block_by_block():
    names = ["layer1.0", "layer1.1", "layer2.0", "layer2.1"]
    scores = np.array([0.9, 0.0, 0.4, 1.0])
    share = np.array([0.5, 0.0, 0.25, 1.0])
    svg = diagram.sketch_blocks(scores, share, names)
    assert sketch_marks(svg) == {"ran": ["layer1.0", "layer2.0", "layer2.1"],
                                 "skipped": ["layer1.1"]}
    root = ET.fromstring(svg)
    boxes = [e for e in root if e.tag.endswith("rect")]
    fills = [e for e in boxes if e.get("class") is None]       # the filled part of a box
    whole = float(boxes[0].get("height"))
    assert [float(e.get("height")) / whole for e in fills] == pytest.approx([0.5, 0.25, 1.0])
    assert [float(e.get("fill-opacity")) for e in fills] == pytest.approx([0.9, 0.4, 1.0])
    assert sum(e.tag.endswith("path") for e in root) == 1      # one skip arc
    assert sketch_marks(diagram.sketch_static([])) == {"ran": ["network"]}


def test_a_written_stage_path_is_sketched():
    names = ["r8", "r20", "r56"]
    svg = diagram.sketch_stages(names, np.array([0, 1, -1]), 1, False)
    assert sketch_marks(svg) == {"reached": ["r8", "r20"], "not-reached": ["r56"],
                                 "left": ["r20"]}
    odd = ['a "big" <net> & co', "r20"]        # a workspace's own system names
    assert sketch_marks(diagram.sketch_stages(odd, np.array([1, -1]), 0, False)) == {
        "reached": odd[:1], "left": odd[:1], "not-reached": odd[1:]}
    # a jump from the first stage to the last, as adaptive records it: the last stage
    # answers without a decision of its own (NOT_REACHED), yet it ran
    decisions = np.array([JUMP, NOT_REACHED, NOT_REACHED])
    jumped = diagram.sketch_stages(names, decisions, 2, True)
    assert sketch_marks(jumped) == {"reached": ["r8", "r56"], "not-reached": ["r20"],
                                    "left": ["r56"]}
    assert sum(e.tag.endswith("path") for e in ET.fromstring(jumped)) == 1   # the jump arc
    assert not any(e.tag.endswith("path") for e in ET.fromstring(svg))
    fig = diagram.staged(names, np.array([0.2, np.nan]), np.array([0.5, 0.5]), decisions, 2,
                         True, "max probability", np.array([10, 0, 90]))
    filled = {s.name.removeprefix("stage:") for s in fig.layout.shapes
              if s.name and s.name.startswith("stage:") and s.fillcolor != "white"}
    assert filled == {"r8", "r56"} and _shapes(fig, "jump")


@pytest.mark.parametrize("name", ["lcnet_resnet20"])   # the gated system of app_env
def test_gated_diagram_marks_the_blocks_the_masked_model_skips(app_env, ws, name):
    system = live.build(ws, name, calibrate=False)
    model = zoo.load_system(ws, name, torch.device("cpu"))
    block_names = model.block_names()
    images = np.asarray(app_env.images()[:12])
    with torch.no_grad():   # reference: the unfolded masked model, outside live
        trace = model(ws.data.to_tensor(images)).trace
    skipped_any = 0
    for i, image in enumerate(images):
        result = live.inspect_image(system, image, timing_repeats=1)
        fig = live.path_diagram(system, result)
        scores = trace.block_scores[i].numpy()
        want_skipped = {n for n, s in zip(block_names, scores) if s == 0}
        assert _drawn(fig) == (set(block_names) - want_skipped, want_skipped)
        assert _shapes(fig, "skip:") == want_skipped
        for cell in _cells(fig, "ran"):
            j = block_names.index(cell[0])
            assert cell[1] == pytest.approx(scores[j], abs=1e-5)
            on = (trace.channel_scores[j][i] > 0).float().mean().item()
            assert cell[2] == pytest.approx(on)
        skipped_any += bool(want_skipped)
    assert skipped_any   # the images exercise skipping (else the test proves little)


@pytest.mark.parametrize("name", ["exits_resnet56", "cascade_r8_r20_r56"])
def test_staged_diagram_marks_the_exit_the_policy_takes(app_env, ws, name):
    system = live.build(ws, name, calibrate=False)
    policy = operating_points.load_policy(ws, name, operating_points.LOSSES[0])
    exits_seen = set()
    for image in np.asarray(app_env.images()[:12]):
        result = live.inspect_image(system, image, timing_repeats=1)
        path = result.path
        fig = live.path_diagram(system, result)
        # reference: the policy's rule on the stages' features: leave at the first early
        # stage whose score reaches its threshold, else answer at the last (or jump there)
        scores, thresholds = policy.exit_scores(path.features)
        leaves = np.flatnonzero(scores >= thresholds)
        first = int(leaves[0]) if len(leaves) else len(path.stage_names) - 1
        want = first if not path.jumped else len(path.stage_names) - 1
        assert _cells(fig, "left here") == [[path.stage_names[want]]]
        exits = _cells(fig, "exits")
        assert [c[0] for c in exits] == path.stage_names[:-1]
        reached = [c[0] for c in exits if c[3] != "not reached"]
        if not path.jumped:   # every early stage up to the exit decided, none after
            assert reached == path.stage_names[:min(want + 1, len(exits))]
        for c, s, t in zip(exits, scores, thresholds):
            assert c[1] == pytest.approx(s, nan_ok=True) and c[2] == pytest.approx(t)
        assert bool(_shapes(fig, "jump")) == path.jumped
        ran = {n for n, m in zip(path.stage_names, path.stage_macs) if m > 0}   # spent MACs
        filled = {s.name.removeprefix("stage:") for s in fig.layout.shapes
                  if s.name and s.name.startswith("stage:") and s.fillcolor != "white"}
        assert filled == ran
        assert sketch_marks(path.sketch())["reached"] == [n for n in path.stage_names
                                                          if n in ran]
        exits_seen.add(want)
    assert exits_seen   # which exits the synthetic zoo reaches varies; each one is checked


@pytest.mark.parametrize("name", ["exits_resnet56", "cascade_r8_r20_r56"])
def test_an_image_that_leaves_early_is_drawn_leaving_there(app_env, ws, name):
    """The synthetic zoo's images mostly run to the end; a policy that leaves at the second
    stage (never at the first, never jumping) makes every image leave early."""
    shipped = operating_points.load_policy(ws, name, operating_points.LOSSES[0])
    k = len(shipped.exits) + 1
    exits = (P.NEVER, P.ALWAYS) + (P.NEVER,) * (k - 3)
    rule = dataclasses.replace(shipped, exits=exits,
                               jumps=(P.NEVER,) * len(shipped.jumps))
    system = live.build(ws, name, rule, calibrate=False)
    result = live.inspect_image(system, np.asarray(app_env.images()[0]), timing_repeats=1)
    names = result.path.stage_names
    fig = live.path_diagram(system, result)
    assert _cells(fig, "left here") == [[names[1]]]
    filled = {s.name.removeprefix("stage:") for s in fig.layout.shapes
              if s.name and s.name.startswith("stage:") and s.fillcolor != "white"}
    assert filled == set(names[:2])
    assert [c[3] for c in _cells(fig, "exits")] == ["continue", "exit"] + ["not reached"] * (k - 3)
    assert sketch_marks(result.path.sketch()) == {"reached": names[:2], "left": [names[1]],
                                                  "not-reached": names[2:]}
    # reference for the MACs: the dense system's own first two stages
    model = zoo.load_system(ws, name, torch.device("cpu"))
    with torch.no_grad():
        stage_macs = model(ws.data.to_tensor(np.asarray(app_env.images()[:1]))).stage_macs[0]
    assert result.macs == int(stage_macs[:2].sum())


def test_static_system_diagram_is_its_blocks(app_env, ws):
    system = live.build(ws, "resnet20", calibrate=False)
    result = live.inspect_image(system, np.asarray(app_env.images()[0]), timing_repeats=1)
    fig = live.path_diagram(system, result)
    want = zoo.load_system(ws, "resnet20", torch.device("cpu")).block_names()
    assert [c[0] for c in _cells(fig, "ran")] == want and not _cells(fig, "skipped")


def test_inspect_page_draws_the_diagram_first_and_keeps_the_details(app_env, ws):
    at = run_page("inspect", inspect_system="lcnet_resnet20",
                  inspect_source="A validation image", inspect_class="ship", inspect_index=2)
    assert not at.exception, [e.value for e in at.exception]
    charts = at.get("plotly_chart")
    specs = [json.loads(c.proto.spec) for c in charts]
    names = [[t.get("name") for t in s["data"]] for s in specs]
    assert names[1] == ["ran", "skipped"]           # after the top-5: the diagram
    assert len(charts) == 4                         # then the strip and the heatmap
    check = ws.split("check", app_env.dataset)
    index = np.flatnonzero(check.labels == ws.data.classes.index("ship"))[2]
    model = zoo.load_system(ws, "lcnet_resnet20", torch.device("cpu"))
    with torch.no_grad():
        scores = model(ws.data.to_tensor(check.images()[index:index + 1])).trace.block_scores[0]
    skipped = [c[0] for c in specs[1]["data"][1].get("customdata", [])]
    assert skipped == [n for n, s in zip(model.block_names(), scores) if s == 0]
