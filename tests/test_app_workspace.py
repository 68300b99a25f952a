"""The pages through Streamlit's AppTest on a workspace with something not there or not
dynviz's: an untrained reference, foreign or malformed JSON beside the checkpoints, a
malformed results.json. The page says so in one line, or leaves it out, never a traceback.
(tests/test_app.py holds the pages on a complete workspace.)"""
from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest

from tests.helpers import run_page


def test_budget_without_its_reference_trained(app_env, app_root, tmp_path, monkeypatch,
                                              fresh_caches):
    """resnet56, the reference, untrained: exits_resnet56 (its own checkpoint) still runs
    under a budget, its accuracy shown with no loss against a reference there is not."""
    shutil.copytree(app_root / "ckpt", tmp_path / "ckpt",
                    ignore=shutil.ignore_patterns("resnet56.*"))
    monkeypatch.setenv("DYNVIZ_CHECKPOINTS", str(tmp_path / "ckpt"))
    at = run_page("budget")
    assert not at.exception and not at.error, [e.value for e in [*at.exception, *at.error]]
    assert at.selectbox(key="budget_system").options == ["exits_resnet56"]
    accuracies = [m for m in at.metric if m.label.startswith("Accuracy (")]
    assert len(accuracies) == 2 and all(m.value.endswith("%") and not m.delta
                                        for m in accuracies)


def test_models_page_skips_what_is_not_a_manifest_and_a_malformed_results_table(
        app_env, tmp_path, monkeypatch, fresh_caches):
    checkpoints, results = tmp_path / "ckpt", tmp_path / "assets" / "results.json"
    checkpoints.mkdir()
    (checkpoints / "resnet8.json").write_text(json.dumps({"name": "resnet8", "model": "resnet8"}))
    (checkpoints / "cut.json").write_text('{"name": "cut", "mod')         # written half
    (checkpoints / "labels.json").write_text('["cat", "dog"]')             # not dynviz's
    (checkpoints / "config.json").write_text('{"lr": 0.1}')
    results.parent.mkdir()
    results.write_text('[{"system": "resnet8", "accur')
    monkeypatch.setenv("DYNVIZ_CHECKPOINTS", str(checkpoints))
    monkeypatch.setenv("DYNVIZ_ASSETS", str(results.parent))
    at = run_page("models")
    assert not at.exception and not at.error, [e.value for e in [*at.exception, *at.error]]
    (warning,) = at.warning
    assert warning.value.startswith(f"{results} is not a results table (JSONDecodeError: ")
    assert warning.value.endswith("; rebuild it with `python -m dynviz ship`")
    tables = [df.value for df in at.dataframe]    # the checkpoints and the papers' rows
    assert len(tables) == 2 and tables[0]["checkpoint"].tolist() == ["resnet8"]
    assert "LC-Net, Table I" in tables[1]["source"].tolist()


def test_a_broken_file_is_one_error_line_and_a_bug_keeps_its_traceback(tmp_path,
                                                                        monkeypatch):
    """What a user can mend (a dataset, a dynviz.toml, a checkpoint, each raised by the
    library on a real file) is one line; a ValueError from a bug is not swallowed."""
    from dynviz import data, policy, workspace, zoo
    from dynviz.ui import state

    shown = []
    monkeypatch.setattr(state.st, "error", shown.append)
    (tmp_path / "dynviz.toml").write_text("reference = [")
    (tmp_path / "cut.pt").write_bytes(b"PK\x03\x04 half a zip")
    (tmp_path / "photos" / "ufo").mkdir(parents=True)
    spec = data.DataSpec(roots=(tmp_path / "photos",), classes=("cat", "dog"), image_size=32,
                         mean=(0.5,) * 3, std=(0.5,) * 3)
    for broken in (lambda: data.open_imagefolder(tmp_path / "photos", spec),
                   lambda: workspace.load(tmp_path),
                   lambda: zoo.read_checkpoint(tmp_path / "cut.pt", fix="train it again")):
        with state.broken_files_shown():
            broken()
    assert len(shown) == 3
    assert shown[0].startswith(f"{tmp_path / 'photos'}: expected sub-folders named after")
    assert str(tmp_path / "dynviz.toml") in shown[1]
    assert shown[2].startswith(f"cannot read {tmp_path / 'cut.pt'}")
    assert "train it again" in shown[2]
    with pytest.raises(ValueError, match="shapes disagree"):    # a bug: the traceback stays
        with state.broken_files_shown():
            policy.StageOutputs(logits=np.zeros((2, 1, 3)), labels=np.zeros(3, dtype=int),
                                stage_costs=np.ones((2, 1)))
    assert len(shown) == 3


def test_a_policy_file_cut_short_or_chosen_for_other_weights_is_one_line(
        app_env, app_root, tmp_path, monkeypatch, fresh_caches):
    """The cascade's shipped ≤0.5% policy: read back as shipped while its members are the
    weights it was chosen on; refused, naming the file and `policies`, once a member has other
    weights (trained again) or the file is cut short. Budget shows the refusal as one line."""
    import torch

    from dynviz import operating_points as O, workspace, zoo

    for part in ("ckpt", "assets"):
        shutil.copytree(app_root / part, tmp_path / part)
        monkeypatch.setenv(f"DYNVIZ_{'CHECKPOINTS' if part == 'ckpt' else 'ASSETS'}",
                           str(tmp_path / part))
    ws, name = workspace.builtin(), "cascade_r8_r20_r56"
    path = O.policy_path(ws, name, 0.005)
    shipped = O.load_policy(ws, name, 0.005)
    fit = zoo.outputs(ws, name, app_env, progress=False).half("fit")     # chosen afresh
    reference = zoo.outputs(ws, ws.reference, app_env, progress=False).half("fit")
    assert shipped == O.choose(fit, reference.correct[:, -1], 0.005, topology="jump")
    older = json.loads(path.read_text())
    del older[O.CHOSEN_FOR]                                 # a file from before the key
    path.write_text(json.dumps(older))
    assert O.load_policy(ws, name, 0.005) == shipped
    path.write_text(json.dumps(older | {O.CHOSEN_FOR: zoo.checkpoint_sha(ws, name)}))

    weights = torch.load(tmp_path / "ckpt" / "resnet8.pt", weights_only=True)
    weights["fc.bias"] = weights["fc.bias"] + 0.5           # resnet8 trained again
    torch.save(weights, tmp_path / "ckpt" / "resnet8.pt")
    with pytest.raises(O.PolicyFileError) as stale:
        O.load_policy(ws, name, 0.005)
    assert str(stale.value) == (f"{path} was chosen for other weights than {name}'s (trained "
                                f"again since?); choose it again with `python -m dynviz "
                                f"policies`")
    at = run_page("budget", budget_system=name)
    assert not at.exception and [e.value for e in at.error] == [str(stale.value)]

    member = tmp_path / "ckpt" / "resnet8.pt"                # damaged, not retrained
    member.write_bytes(member.read_bytes()[:4096])
    with pytest.raises(zoo.CheckpointError, match=f"^cannot read {re.escape(str(member))}: "
                                                  "truncated or corrupt"):
        O.load_policy(ws, name, 0.005)
    path.write_text(path.read_text()[:40])                  # cut short
    with pytest.raises(O.PolicyFileError, match=f"^{re.escape(str(path))} is not a dynviz "
                                                r"policy \(JSONDecodeError: .*`python -m "
                                                r"dynviz policies`$"):
        O.load_policy(ws, name, 0.005)


def test_inspect_without_the_dataset_says_where_it_looked(app_env, app_root, tmp_path,
                                                           monkeypatch, fresh_caches):
    """DYNVIZ_DATA at a directory with no dataset: uploads only, and a line saying why."""
    from dynviz import data, workspace

    monkeypatch.setenv("DYNVIZ_DATA", str(tmp_path / "nothing-here"))
    at = run_page("inspect")
    assert not at.exception and not at.error
    assert at.radio(key="inspect_source").options == ["Upload an image"]
    (why,) = [e for e in at.expander if e.label.startswith("No validation images")]
    (said,) = [m.value for m in why.markdown]
    assert said == data.missing_data_message(workspace.builtin().data)
    assert str(tmp_path / "nothing-here") in said
