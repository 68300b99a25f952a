"""Click to explore: a gallery image opens its compute path in a dialog, with a link to the
same view in Inspect when Inspect can address the image (it shows the check half)."""
from __future__ import annotations

import numpy as np
import streamlit as st

from dynviz import live
from dynviz.ui import share, state
from dynviz.workspace import Workspace


@st.dialog("Compute path", width="large")
def compute_path(ws: Workspace, name: str, position: int, image: np.ndarray,
                 labels: np.ndarray) -> None:
    """``position``: the image's in the validation split; ``image``: (S, S, 3) uint8, it;
    ``labels``: (N,) the split's."""
    try:
        live_system = state.live_system(ws, name, None)   # the shipped operating point
    except FileNotFoundError as err:                      # a staged system without one
        st.warning(str(err))
        return
    result = live.inspect_image(live_system, image)
    label = ws.data.classes[int(labels[position])]
    st.caption(f"{name}, validation image {position} (a {label})")
    left, right = st.columns([1, 2])
    left.image(result.image, width=160)
    left.metric("Prediction", result.prediction)
    left.metric("MACs", f"{result.macs / 1e6:.1f} M",
                f"{result.macs / result.macs_dense - 1:+.0%} vs dense", delta_color="inverse")
    with right:   # what Inspect draws (the galleries show dynamic systems only)
        st.plotly_chart(live.path_diagram(live_system, result), key="explore_diagram")
        if result.path is not None:
            if result.path.caption():
                st.caption(result.path.caption())
            with st.expander("Detail: the path's scores"):
                for key, figure in result.path.figures().items():
                    st.plotly_chart(figure, key=f"explore_{key}")
    k = share.check_address(labels, position)
    if k is not None:
        st.page_link("dynviz/ui/inspect_page.py", label="Open in Inspect",
                     icon=":material/search:",
                     query_params=share.inspect_params(name, label, k))
    else:
        st.caption("A *fit*-half image: Inspect picks from the *check* half, where policies "
                   "are judged, so it has no link to this one.")
