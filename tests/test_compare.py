"""Inspect's tables: one image through every system (``dynviz.compare.compare``) and several
uploads through one (``run_batch``), against ``predict``, ``live.inspect_image`` and the
models' own traces; then both through the Inspect page in AppTest."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from dynviz import compare, live, operating_points, uploads, zoo
from dynviz.adaptive import AdaptiveClassifier
from dynviz.cli import main
from tests.helpers import run_page, sketch_marks


def _png(colour, size=(48, 40)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "PNG")
    return buf.getvalue()


def _traced(ws, name: str, image: np.ndarray) -> tuple[int, dict[str, list[str]]]:
    """What the unfolded checkpoint's own trace says of ``image`` (staged systems under the
    shipped ≤0.5% loss point, as compare runs them): its MACs, and the marks its sketch
    should carry (``tests.helpers.sketch_marks``)."""
    model = zoo.load_system(ws, name, torch.device("cpu"))
    if model.n_stages > 1:
        model = AdaptiveClassifier(model, operating_points.load_policy(
            ws, name, operating_points.LOSSES[0]))
    with torch.no_grad():
        out = model(ws.data.to_tensor(image[None]))
    trace = out.trace
    if hasattr(trace, "exit_stage"):
        ran = trace.stage_macs[0] > 0
        marks = {"reached": [n for n, r in zip(trace.stage_names, ran) if r],
                 "left": [trace.stage_names[int(trace.exit_stage[0])]]}
        if not ran.all():
            marks["not-reached"] = [n for n, r in zip(trace.stage_names, ran) if not r]
    else:
        scores = (trace.block_scores[0].numpy() if hasattr(trace, "block_scores")
                  else np.ones(len(model.block_names())))
        marks = {"ran": [n for n, s in zip(model.block_names(), scores) if s > 0]}
        if (scores == 0).any():
            marks["skipped"] = [n for n, s in zip(model.block_names(), scores) if s == 0]
    return int(out.macs[0]), marks


def test_compare_has_each_systems_predict_answer_and_trace_macs(app_env, ws, tmp_path,
                                                                capsys):
    path = tmp_path / "teal.png"
    path.write_bytes(_png((20, 160, 150)))
    image = uploads.preprocess_upload(path.read_bytes(), ws.data.image_size)
    label = 3
    comparison = compare.compare(ws, image, label)
    rows = comparison.rows()
    names = zoo.available(ws)
    assert len(names) >= 5 and {ws.spec(n).kind for n in names} >= {"static", "gated",
                                                                    "exits", "cascade"}
    assert [r["system"] for r in rows] == names and not comparison.skipped
    for r in rows:
        assert main(["predict", r["system"], str(path)]) == 0
        said = json.loads(capsys.readouterr().out)
        assert r["prediction"] == said["prediction"], r["system"]
        assert r["correct"] == (said["prediction"] == ws.data.classes[label])
        macs, marks = _traced(ws, r["system"], image)
        assert r["macs"] == said["macs"] == macs, r["system"]
        assert sketch_marks(r["sketch"]) == marks, r["system"]
        assert r["mac_share"] == pytest.approx(said["mac_fraction"], abs=1e-4)
        assert r["ms"] > 0
        if "blocks_executed" in said:
            assert r["route"] == f"{said['blocks_executed']} of {said['blocks']} blocks ran"
        elif "exit" in said:
            assert r["route"].startswith(f"exited at {said['exit']}")
        else:
            assert r["route"] == compare.STATIC_ROUTE
    assert "correct" not in compare.compare(ws, image).rows()[0]   # an upload: no label


def test_compare_skips_a_staged_system_without_an_operating_point(app_env, ws, monkeypatch):
    real = operating_points.load_policy
    monkeypatch.setattr(operating_points, "load_policy",
                        lambda w, name, loss: None if name == "exits_resnet56"
                        else real(w, name, loss))
    image = uploads.preprocess_upload(_png((90, 90, 10)), ws.data.image_size)
    comparison = compare.compare(ws, image)
    assert "exits_resnet56" not in [r["system"] for r in comparison.rows()]
    assert "policies" in comparison.skipped["exits_resnet56"]
    assert len(comparison.rows()) == len(zoo.available(ws)) - 1


BATCH = [("red.png", _png((200, 30, 30))), ("notes.jpg", b"this is text, not a picture"),
         ("blue.png", _png((20, 40, 220), size=(64, 64)))]


def _wanted(ws, name: str) -> list[dict]:
    """The answers ``live.inspect_image`` gives for the good files of ``BATCH``."""
    system = live.build(ws, name)
    return [live.inspect_image(system, uploads.preprocess_upload(raw, ws.data.image_size))
            .summary() for _, raw in (BATCH[0], BATCH[2])]


def test_run_batch_answers_the_good_files_and_names_the_bad_one(app_env, ws):
    batch = compare.run_batch(live.build(ws, "lcnet_resnet20"), BATCH)
    assert [f for f, _ in batch.failures] == ["notes.jpg"]
    wanted = _wanted(ws, "lcnet_resnet20")
    assert wanted[0]["top5"] != wanted[1]["top5"]      # so that a mix-up of files shows
    rows = batch.rows()
    assert [r["file"] for r in rows] == ["red.png", "blue.png"]
    for r, want in zip(rows, wanted):
        assert (r["prediction"], r["macs"]) == (want["prediction"], want["macs"])
        assert r["route"] == f"{want['blocks_executed']} of {want['blocks']} blocks ran"
    model = zoo.load_system(ws, "lcnet_resnet20", torch.device("cpu"))
    for r, (_, raw) in zip(rows, (BATCH[0], BATCH[2])):
        image = uploads.preprocess_upload(raw, ws.data.image_size)
        assert sketch_marks(r["sketch"]) == _traced(ws, "lcnet_resnet20", image)[1]
        assert set(sketch_marks(r["sketch"])["ran"]) <= set(model.block_names())


def test_inspect_page_multi_upload_with_a_bad_file(app_env, ws):
    at = run_page("inspect", inspect_system="lcnet_resnet20",
                  inspect_source="Upload an image")
    at.file_uploader(key="inspect_upload").set_value(
        [(name, raw, "image/png") for name, raw in BATCH]).run()
    assert not at.exception, [e.value for e in at.exception]
    assert len(at.warning) == 1 and "notes.jpg" in at.warning[0].value
    table = at.dataframe(key="inspect_batch_table").value
    wanted = _wanted(ws, "lcnet_resnet20")
    assert list(table["file"]) == ["red.png", "blue.png"]
    assert list(table["prediction"]) == [w["prediction"] for w in wanted]
    assert list(table["macs"]) == pytest.approx([w["macs"] / 1e6 for w in wanted])
    assert not [m for m in at.metric if m.label == "Prediction"]   # until a row is picked
    # one file: Inspect as before, no table
    at.file_uploader(key="inspect_upload").set_value([BATCH[2][:2] + ("image/png",)]).run()
    assert not at.exception and not at.warning
    shown = [m for m in at.metric if m.label == "Prediction"]
    assert shown and shown[0].value == wanted[1]["prediction"]
    assert not [d for d in at.dataframe if d.key == "inspect_batch_table"]


def test_inspect_page_compares_every_system_on_a_validation_image(app_env, ws):
    at = run_page("inspect", inspect_system="resnet20", inspect_compare=True)
    assert not at.exception, [e.value for e in at.exception]
    table = at.dataframe[0].value   # a table without selection keeps no key in AppTest
    assert list(table["system"]) == zoo.available(ws)
    # the validation image shown: the first check image of the first class
    check = ws.split("check", app_env.dataset)
    index = int(np.flatnonzero(check.labels == 0)[0])
    image = check.images()[index]
    wanted = [live.inspect_image(live.build(ws, name), image).prediction
              for name in zoo.available(ws)]
    assert list(table["prediction"]) == wanted
    assert list(table["correct"]) == ["✓ right" if p == ws.data.classes[0] else "✗ wrong"
                                      for p in wanted]
    for name, sketch in zip(table["system"], table["sketch"]):   # the path drawn small
        assert sketch_marks(sketch) == _traced(ws, name, image)[1], name
