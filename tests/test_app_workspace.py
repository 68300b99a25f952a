"""The pages through Streamlit's AppTest on a workspace with something not there or not
dynviz's: an untrained reference, foreign or malformed JSON beside the checkpoints, a
malformed results.json. The page says so in one line, or leaves it out, never a traceback.
(tests/test_app.py holds the pages on a complete workspace.)"""
from __future__ import annotations

import json
import shutil

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
