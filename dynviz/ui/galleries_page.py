"""Galleries: the cheapest and costliest images (LC-Net Fig. 6), per-class channel firing
(Fig. 7) and per-class mean cost."""
from __future__ import annotations

import numpy as np
import streamlit as st

from dynviz import data, gallery as G, plots, zoo
from dynviz.ui import explore, state

N_SHOWN = 8


def gallery(title: str, shown: np.ndarray, cost, pred, labels, images,
            classes: tuple[str, ...]) -> tuple[int, np.ndarray] | None:
    """``shown``: positions in the split; ``images``: (len(shown), S, S, 3), theirs. Returns
    the (position, image) whose "Path" button was clicked, if one was."""
    st.subheader(title)
    cols = st.columns(N_SHOWN)
    clicked = None
    for col, i, image in zip(cols, shown, images):
        ok = "✓" if pred[i] == labels[i] else "✗"
        col.image(image, width=96,
                  caption=f"{classes[labels[i]]} → {classes[pred[i]]} {ok} "
                          f"{cost[i] / 1e6:.1f}M")
        if col.button("Path", key=f"gallery_open_{title}_{i}",
                      help=f"Validation image {i} through the system, its compute path"):
            clicked = (int(i), image)
    return clicked


@state.broken_files_shown()
def render() -> None:
    st.title("Galleries")
    ws = state.workspace()
    if not zoo.dynamic(ws, list(ws.systems)):
        st.info(f"The workspace {ws.name} has only static systems, which spend the same on "
                f"every image: there is nothing to rank.")
        return
    names = zoo.dynamic(ws, zoo.available(ws))
    if not names:   # a static network spends the same on every image: nothing to rank
        st.info("No dynamic system is trained yet.\n\n" + state.missing_systems_message(ws))
        return
    split = state.val_split(ws)
    if split is None:
        st.warning(data.missing_data_message(ws.data))
        return
    classes = ws.data.classes
    name = st.selectbox("System", names, index=state.start_index(ws, names),
                        key="gallery_system",
                        help="Dynamic systems only: a static network spends the same on "
                             "every image.")
    cached = state.outputs(ws, name)
    cost, pred, reference = G.per_image_cost(ws, name, cached)
    labels = cached.arrays["labels"].astype(int)
    cls = st.selectbox("Class", ["all"] + list(classes), key="gallery_class")
    members = np.arange(len(labels)) if cls == "all" else \
        np.flatnonzero(labels == classes.index(cls))
    order = members[np.argsort(cost[members], kind="stable")]
    for title, shown in (("Cheapest", order[:N_SHOWN]), ("Costliest", order[::-1][:N_SHOWN])):
        clicked = gallery(title, shown, cost, pred, labels, state.shown_images(split, shown),
                          classes)
        if clicked is not None:
            explore.compute_path(ws, name, *clicked, labels)
    per_class = np.array([cost[labels == c].mean() for c in range(len(classes))])
    st.plotly_chart(plots.class_cost(per_class, classes, reference), key="gallery_class_cost")
    if "blocks_run" in cached.arrays:
        names_b = cached.manifest["block_names"]
        if st.session_state.get("gallery_block_for") != name or \
                "gallery_block" not in st.session_state:
            # a system just chosen (or the picker just back after a system without one):
            # start on its block whose firing differs most by class
            st.session_state["gallery_block"] = state.class_specific_block(ws, name)
            st.session_state["gallery_block_for"] = name
        block = st.selectbox("Block", range(len(names_b)), format_func=lambda i: names_b[i],
                             key="gallery_block",
                             help="Starts on the block whose channels fire most differently "
                                  "from class to class.")
        rates = G.class_firing_rates(cached, block, len(classes))
        st.plotly_chart(plots.class_firing(rates, classes, names_b[block]),
                        key="gallery_firing")


render()
