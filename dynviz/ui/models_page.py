"""Models: every system with accuracy, MACs and measured speedups, beside the papers' rows."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import streamlit as st

from dynviz import zoo
from dynviz.ui import state
from dynviz.workspace import Workspace

PAPER_ROWS = [
    {"source": "LC-Net, Table I", "system": "ResNet-18 (CIFAR-10) baseline",
     "accuracy": "93.0%", "MACs": "0.55 G", "note": ""},
    {"source": "LC-Net, Table I", "system": "LC-Net ResNet-18 from scratch",
     "accuracy": "95.3%", "MACs": "0.33 G", "note": ""},
    {"source": "LC-Net, Table I", "system": "LC-Net ResNet-18 pre-trained + L1",
     "accuracy": "93.3%", "MACs": "0.19 G (parallel) / 0.06 G (sequential)", "note": ""},
    {"source": "LC-Net", "system": "ResNet-50 (ImageNet)", "accuracy": "",
     "MACs": "4.09 → 2.89 G", "note": ""},
    {"source": "Bolukbasi et al.", "system": "network selection (ImageNet)",
     "accuracy": "< 1% top-5 loss", "MACs": "", "note": "2.8× speedup; 1.9× with no loss"},
    {"source": "Bolukbasi et al.", "system": "early exit (ImageNet)", "accuracy": "",
     "MACs": "", "note": "20–30% less compute"},
]


_PERCENT = st.column_config.NumberColumn(format="%.2f%%")   # columns hold percentages
_TIMES = st.column_config.NumberColumn(format="%.2f×")
_MILLIONS = st.column_config.NumberColumn(format="%.1f")
RESULT_COLUMNS = {"accuracy": _PERCENT, "MACs (M)": _MILLIONS, "MAC reduction": _TIMES,
                  "speedup b1": _TIMES, "speedup b256": _TIMES}
CHECKPOINT_COLUMNS = {"check accuracy": _PERCENT, "MACs (M)": _MILLIONS}
# wide enough for the longest entries, which the default widths cut off
PAPER_COLUMNS = {"system": st.column_config.TextColumn(width="medium"),
                 "MACs": st.column_config.TextColumn(width="medium"),
                 "note": st.column_config.TextColumn(width="medium")}


def _height(n_rows: int) -> int:
    """Pixels that show a table of ``n_rows`` whole, header included, without scrolling."""
    return 35 * (n_rows + 1) + 3


def results_rows(ws: Workspace) -> list[dict]:
    """From the workspace's ``results.json`` (``python -m dynviz ship`` writes it).

    Raises:
        ValueError: the file is not such a table (named, with how to rebuild it).
    """
    path = ws.results / "results.json"
    if not path.exists():
        return []
    try:
        return [{"system": r["system"], "operating point": r["operating_point"],
                 "accuracy": 100 * r["accuracy"], "MACs (M)": r["macs_mean"] / 1e6,
                 "MAC reduction": r["macs_reduction"], "speedup b1": r["speedup_b1"],
                 "speedup b256": r["speedup_b256"]} for r in json.loads(path.read_text())]
    except (ValueError, KeyError, TypeError) as err:   # not JSON, or not ship's rows
        raise ValueError(f"{path} is not a results table ({type(err).__name__}: {err}); "
                         f"rebuild it with `{ws.command('ship')}`") from None


def _manifest(path: Path) -> dict | None:
    """A checkpoint's manifest, or None for a JSON file beside the checkpoints that is not
    one (unreadable, or written by something else)."""
    try:
        meta = json.loads(path.read_text())
    except (OSError, ValueError):           # ValueError: not UTF-8, or not JSON
        return None
    return meta if isinstance(meta, dict) and isinstance(meta.get("name"), str) else None


def checkpoint_rows(ws: Workspace) -> list[dict]:
    """From the manifests (``NAME.json``) beside the workspace's checkpoints."""
    rows = []
    for meta in filter(None, map(_manifest, sorted(ws.checkpoints.glob("*.json")))):
        check = (meta.get("metrics") or {}).get("check") or {}
        acc = check.get("accuracy")
        acc = acc[-1] if isinstance(acc, list) else acc
        rows.append({"checkpoint": meta["name"], "model": meta.get("model"),
                     "check accuracy": None if acc is None else 100 * acc,
                     "MACs (M)": (check.get("macs_mean") or 0) / 1e6,
                     "epochs": len(meta.get("history", [])),
                     "train minutes": round(meta.get("wall_seconds", 0) / 60)})
    return rows


@state.broken_files_shown()
def render() -> None:
    st.title("Models")
    ws = state.workspace()
    try:
        rows = results_rows(ws)
    except ValueError as err:      # the rest of the page stands without the table
        st.warning(str(err))
        rows = []
    if rows:
        st.subheader(f"Results on the check half (vs {ws.reference})")
        st.dataframe(pd.DataFrame(rows), hide_index=True, key="results",
                     height=_height(len(rows)), column_config=RESULT_COLUMNS, placeholder="—")
        st.caption(f"Speedups are measured wall-clock against {ws.reference} on this "
                   f"machine; an oracle is a bound, not a runnable system, so it has none.")
    st.subheader("Trained checkpoints")
    ckpts = checkpoint_rows(ws)
    if ckpts:
        st.dataframe(pd.DataFrame(ckpts), hide_index=True, key="checkpoints",
                     height=_height(len(ckpts)), column_config=CHECKPOINT_COLUMNS)
    if any(zoo.missing(ws, n) for n in ws.systems):
        st.info(state.missing_systems_message(ws))
    st.subheader("The papers' figures")
    st.dataframe(pd.DataFrame(PAPER_ROWS), hide_index=True, key="papers",
                 column_config=PAPER_COLUMNS)


render()
