"""Shareable views: the URL's query parameters carry what a page shows.

Inspect reads ``?system=NAME&class=CLASS&index=K`` (K: the K-th check-half image of that
class, from 0, as its slider counts) and Budget ``?system=NAME&budget=PCT``. The parsers are
pure: they turn the parameters into the widget values to set before the widgets are drawn,
plus one note per value they cannot use (that value keeps its default), never an exception.
The two Streamlit helpers at the end apply a link once, when it arrives, and write the view
back as the user changes it.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import streamlit as st

from dynviz import data
from dynviz.ui import state

BUDGET_RANGE = (5, 100)     # % of the dense cost, the Budget slider's range


@dataclass(frozen=True)
class View:
    values: dict[str, object] = field(default_factory=dict)   # widget key -> value to set
    notes: tuple[str, ...] = ()                                # one per unusable parameter


def _whole(text: str) -> int | None:
    """``text`` as a whole number ("7", " 7 ", "7.0"), else None."""
    try:
        number = float(text)
    except (TypeError, ValueError):
        return None
    return int(number) if number.is_integer() else None


def _system(params: Mapping[str, str], systems: Sequence[str], key: str,
            notes: list[str], values: dict) -> None:
    if "system" not in params:
        return
    if params["system"] in systems:
        values[key] = params["system"]
    else:
        notes.append(f"The link's system={params['system']!r} is not one available here "
                     f"({', '.join(systems)}); showing the default system.")


def parse_inspect(params: Mapping[str, str], systems: Sequence[str],
                  check_counts: Mapping[str, int] | None) -> View:
    """Inspect's widget values from ``params``. ``check_counts``: each class's number of
    check-half images, or None when the dataset is absent (no validation image to open)."""
    notes: list[str] = []
    values: dict[str, object] = {}
    _system(params, systems, "inspect_system", notes, values)
    if "class" not in params and "index" not in params:
        return View(values, tuple(notes))
    if check_counts is None:
        notes.append("The link names a validation image, but the dataset is absent here; "
                     "upload an image instead.")
        return View(values, tuple(notes))
    cls = params.get("class")
    if cls is not None and cls not in check_counts:
        notes.append(f"The link's class={cls!r} is not a class here; showing the default "
                     f"class ({', '.join(check_counts)}).")
        cls = None
    if cls is not None:
        values |= {"inspect_source": "A validation image", "inspect_class": cls,
                   "inspect_index": 0}
    if "index" in params:
        k = _whole(params["index"])
        if cls is None:
            notes.append(f"The link's index={params['index']!r} needs a valid class; showing "
                         f"the first image.")
        elif k is None or not 0 <= k < check_counts[cls]:
            notes.append(f"The link's index={params['index']!r} is not an image of {cls} "
                         f"here (0 to {check_counts[cls] - 1}); showing the first one.")
        else:
            values["inspect_index"] = k
    return View(values, tuple(notes))


def parse_budget(params: Mapping[str, str], systems: Sequence[str]) -> View:
    """Budget's widget values from ``params`` (the budget under ``budget_from_link``: the
    page puts it on the slider once the system's starting point is set)."""
    notes: list[str] = []
    values: dict[str, object] = {}
    _system(params, systems, "budget_system", notes, values)
    if "budget" in params:
        percent = _whole(params["budget"])
        lo, hi = BUDGET_RANGE
        if percent is None or not lo <= percent <= hi:
            notes.append(f"The link's budget={params['budget']!r} is not a whole percent "
                         f"from {lo} to {hi}; showing the system's starting budget.")
        else:
            values["budget_from_link"] = percent
    return View(values, tuple(notes))


def inspect_params(system: str, cls: str | None, index: int | None) -> dict[str, str]:
    """The query parameters of an Inspect view (an uploaded image has none of its own)."""
    params = {"system": system}
    if cls is not None:
        params |= {"class": cls, "index": str(index or 0)}
    return params


def check_address(labels: np.ndarray, position: int) -> int | None:
    """Inspect's ``index`` of the validation image at ``position`` (``labels``: (N,), the val
    split's): its rank among its class's check-half images (the odd positions,
    ``data.HALVES``), or None for a fit-half image (Inspect shows only check)."""
    positions = np.arange(len(labels))[data.HALVES["check"]]
    if position not in positions:
        return None
    earlier = positions[positions < position]
    return int((np.asarray(labels)[earlier] == labels[position]).sum())


# --- Streamlit side -------------------------------------------------------------------------

def check_counts(ws) -> dict[str, int] | None:
    """Each class's number of check-half images, or None when the dataset is absent."""
    split = state.val_split(ws)
    if split is None:
        return None
    labels = ws.split("check", split.dataset).labels
    counts = np.bincount(labels, minlength=ws.data.n_classes)
    return dict(zip(ws.data.classes, counts.tolist()))


def arrived(page: str) -> dict[str, str] | None:
    """The URL's parameters if they arrived from outside since ``page`` last wrote them (a
    link opened, a click on another page), else None: the page's own widgets rule."""
    params = st.query_params.to_dict()
    return None if params == st.session_state.get(f"share_{page}_written") else params


def apply(view: View) -> None:
    """Sets the view's widget values (before those widgets are drawn) and shows its notes."""
    for key, value in view.values.items():
        st.session_state[key] = value
    for note in view.notes:
        st.info(note, icon=":material/link_off:")


def write(page: str, params: dict[str, str]) -> None:
    """Puts ``params`` in the URL (a link to the view now shown)."""
    if st.query_params.to_dict() != params:
        st.query_params.from_dict(params)
    st.session_state[f"share_{page}_written"] = params
