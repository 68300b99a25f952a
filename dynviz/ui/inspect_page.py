"""Inspect: one image through one system, with its compute path."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import streamlit as st

from dynviz import data, decode, live, operating_points, plots, uploads, zoo
from dynviz.ui import compare_view, share, state
from dynviz.workspace import Workspace

MAX_UPLOAD_MB = 20   # .streamlit/config.toml's server.maxUploadSize refuses larger ones first


@dataclass(frozen=True)
class InspectInputs:
    system: str
    policy_json: str | None
    image: np.ndarray | None
    label: int | None = None      # the image's class when known (a validation image)


def choose_policy(ws: Workspace, name: str) -> str | None:
    if ws.spec(name).kind not in ("exits", "cascade"):
        return None
    options = {f"≤{loss * 100:g}% accuracy loss": operating_points.load_policy(ws, name, loss)
               for loss in operating_points.LOSSES}
    from_budget = st.session_state.get("budget_policy", {}).get(name)
    if from_budget:
        options["from the Budget page"] = from_budget
    options = {k: v for k, v in options.items() if v is not None}
    if not options:
        st.warning(f"No operating point for {name} yet: run `{live.policies_command(ws)}` "
                   "or pick one on the Budget page.")
        st.stop()
    label = st.selectbox("Operating point", list(options), key="inspect_point")
    chosen = options[label]
    return chosen if isinstance(chosen, str) else chosen.to_json()


def choose_image(ws: Workspace, system: str, policy_json: str | None
                 ) -> tuple[np.ndarray | None, int | None]:
    """The image and its label (None for an upload); several uploads show their own table
    and stop the page here."""
    size = ws.data.image_size
    split = state.val_split(ws)
    sources = ["Upload an image"] + (["A validation image"] if split is not None else [])
    source = st.radio("Image", sources, index=len(sources) - 1, horizontal=True,
                      key="inspect_source")   # a validation image when there is one
    if split is None:
        with st.expander("No validation images to pick from: the dataset was not found"):
            st.markdown(data.missing_data_message(ws.data))
    if source == "Upload an image":
        files = st.file_uploader("Image files", type=list(decode.IMAGE_SUFFIXES),
                                 key="inspect_upload", accept_multiple_files=True,
                                 help=f"Up to {MAX_UPLOAD_MB} MB each; resized to "
                                      f"{size}×{size}. Several give a table.")
        if len(files) > 1:
            compare_view.render_batch(files, state.live_system(ws, system, policy_json),
                                      MAX_UPLOAD_MB, render_result)
            st.stop()
        if not files:
            return None, None
        upload = files[0]
        if upload.size > MAX_UPLOAD_MB * 2**20:
            st.error(f"{upload.name} is {upload.size / 2**20:.0f} MB; the limit is "
                     f"{MAX_UPLOAD_MB} MB.")
            return None, None
        try:
            return uploads.preprocess_upload(upload.getvalue(), size), None
        except uploads.InvalidImageError as err:
            st.error(f"Cannot use {upload.name}: {err}")
            return None, None
    check = ws.split("check", split.dataset)
    classes = ws.data.classes
    cls = st.selectbox("Class", classes, key="inspect_class")
    members = np.flatnonzero(check.labels == classes.index(cls))
    # every class has one check image at least (data.split_indices); a slider needs two
    k = 0 if len(members) == 1 else st.slider(
        "Image of that class (check half)", 0, len(members) - 1, 0, key="inspect_index")
    return state.shown_images(check, members[k:k + 1])[0], classes.index(cls)


def render_result(result, diagram=None) -> None:
    """``diagram``: the compute-path figure (``live.path_diagram``), drawn first under the
    answer; the path's strip and heatmap go below it as detail views."""
    left, right = st.columns([1, 2])
    with left:
        height, width = result.image.shape[:2]
        st.image(result.image, caption=f"as the model sees it ({width}×{height})",
                 width=max(192, width))
        st.metric("Prediction", result.prediction)
        st.plotly_chart(plots.top_k(result.probs, result.classes), key="inspect_top5")
    with right:
        c1, c2, c3 = st.columns(3)
        c1.metric("MACs", f"{result.macs / 1e6:.1f} M",
                  f"{result.macs / result.macs_dense - 1:+.0%} vs dense", delta_color="inverse")
        timing = ("Measured on this server: the median of a few interleaved runs of the "
                  "dynamic and the dense path, after a warm-up. One image takes milliseconds, "
                  "so other load on the machine moves it; docs/benchmarks.md times many.")
        c2.metric("Dynamic run", f"{result.ms_dynamic:.2f} ms", help=timing)
        c3.metric("Dense run", f"{result.ms_dense:.2f} ms",
                  f"{result.ms_dense / result.ms_dynamic:.2f}× speedup", delta_color="off",
                  delta_arrow="off",
                  help=timing)
        if result.path is not None and result.path.caption():
            st.caption(result.path.caption())
    if diagram is not None:
        st.plotly_chart(diagram, key="inspect_diagram")
    if result.path is not None:
        with st.expander("Detail: the path's scores"):
            for key, figure in result.path.figures().items():
                st.plotly_chart(figure, key=key)


@state.broken_files_shown()
def render() -> None:
    st.title("Inspect")
    ws = state.workspace()
    names = zoo.available(ws)
    if not names:
        st.info(state.missing_systems_message(ws))
        return
    link = share.arrived("inspect")
    if link is not None:    # a link just opened: its view, before the widgets are drawn
        share.apply(share.parse_inspect(link, names, share.check_counts(ws)))
    name = st.selectbox("System", names, index=state.start_index(ws, names),
                        key="inspect_system")
    policy_json = choose_policy(ws, name)
    inputs = InspectInputs(name, policy_json, *choose_image(ws, name, policy_json))
    shown = st.session_state.get("inspect_source") == "A validation image"
    share.write("inspect", share.inspect_params(
        name, st.session_state.get("inspect_class") if shown else None,
        st.session_state.get("inspect_index", 0)))
    if inputs.image is None:
        st.caption("Pick or upload an image to see its compute path.")
        return
    system = state.live_system(ws, inputs.system, inputs.policy_json)
    result = live.inspect_image(system, inputs.image)
    render_result(result, live.path_diagram(system, result))
    compare_view.render_compare(ws, inputs.image, inputs.label)


render()
