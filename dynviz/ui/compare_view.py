"""Inspect's two tables: one image through every system ("Compare systems") and several
uploaded images through one system."""
from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import streamlit as st

from dynviz import compare, live
from dynviz.ui import state
from dynviz.workspace import Workspace

COLUMNS = {   # a row of ``compare.row`` -> what the table shows
    "file": st.column_config.TextColumn("file"),
    "system": st.column_config.TextColumn("system"),
    "kind": st.column_config.TextColumn("kind"),
    "prediction": st.column_config.TextColumn("prediction"),
    "correct": st.column_config.TextColumn("right?"),
    "macs": st.column_config.NumberColumn("MACs (M)", format="%.1f"),
    "mac_share": st.column_config.NumberColumn("of dense", format="%.0f%%"),
    "ms": st.column_config.NumberColumn("latency (ms)", format="%.2f",
                                        help="Measured on this server: one run after a "
                                             "warm-up, so other load moves it."),
    "route": st.column_config.TextColumn("path"),
    "sketch": st.column_config.ImageColumn(
        "compute path", width="medium",
        help="Blocks: filled where they ran (height: the share of channels computed), "
             "dotted under a red arc where skipped. Stages: filled where reached; the "
             "green dot is where the image left."),
}


def _shown(rows: list[dict]) -> list[dict]:
    """Rows in the units the table shows (MACs in millions, share in percent)."""
    def cell(key, value):
        if key == "macs":
            return value / 1e6
        if key == "mac_share":
            return 100 * value
        if key == "correct":
            return "✓ right" if value else "✗ wrong"
        return value
    return [{k: cell(k, v) for k, v in r.items()} for r in rows]


def render_compare(ws: Workspace, image: np.ndarray, label: int | None) -> None:
    """The "Compare systems" toggle and, when on, the table of every system's answer."""
    if not st.toggle("Compare systems", key="inspect_compare",
                     help="Run this image through every available system of the workspace "
                          "(staged ones at their ≤0.5% loss point)."):
        return
    comparison = compare.compare(ws, image, label,
                                 live_for=lambda name, pj: state.live_system(ws, name, pj))
    st.dataframe(_shown(comparison.rows()), hide_index=True, key="inspect_compare_table",
                 column_config=COLUMNS)
    for name, why in comparison.skipped.items():
        st.caption(f"{name} not compared: {why}")


def render_batch(files: Sequence, system: live.LiveSystem, max_mb: int,
                 show_result: Callable[[live.InspectResult], None]) -> None:
    """Several uploads through ``system``: a warning per unusable file, a sortable table of
    the others; the selected row's image is shown in full by ``show_result``."""
    usable = []
    for f in files:
        if f.size > max_mb * 2**20:
            st.warning(f"Cannot use {f.name}: it is {f.size / 2**20:.0f} MB; the limit is "
                       f"{max_mb} MB.")
        else:
            usable.append(f)
    # kept while the files and the system stay: a row selection reruns the page, and the
    # table must not change (nor its latencies be measured again) under the selection
    key = (system.name, id(system), tuple(f.file_id for f in usable))
    kept = st.session_state.get("inspect_batch")
    if kept is None or kept[0] != key:
        kept = (key, compare.run_batch(system, [(f.name, f.getvalue()) for f in usable]))
        st.session_state["inspect_batch"] = kept
    batch = kept[1]
    for name, why in batch.failures:
        st.warning(f"Cannot use {name}: {why}")
    if not batch.results:
        return
    event = st.dataframe(_shown(batch.rows()), hide_index=True, key="inspect_batch_table",
                         column_config=COLUMNS, on_select="rerun",
                         selection_mode="single-row")
    picked = event.selection.rows
    if not picked:
        st.caption("Select a row to see that image's compute path.")
        return
    chosen = batch.results[picked[0]]
    st.subheader(batch.files[picked[0]])
    result = live.inspect_image(system, chosen.image)
    show_result(result, live.path_diagram(system, result))
