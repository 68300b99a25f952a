"""Process-wide cached resources for the pages (the library stays Streamlit-free).

Models, live systems and cached outputs are shared by every session (``st.cache_resource``);
small derived results keyed by scalars use ``st.cache_data``. The caches that grow with what
sessions ask for are bounded: live systems (one per system and operating point, each with a
store of weight slices of at most ``live.SLICE_STORE_BYTES``) and stage timings.
"""
from __future__ import annotations

import contextlib

import streamlit as st

from dynviz import (budget, cache, data, gallery, live, operating_points, policy as P,
                    runtime, zoo)



@st.cache_resource(show_spinner=False)
def _allocator_tuned() -> bool:
    """Once per process, before the first live timing: freed memory is reused rather than
    faulted back in, which steadies batch-1 latencies (``runtime.keep_freed_memory``)."""
    return runtime.keep_freed_memory()


@contextlib.contextmanager
def broken_files_shown():
    """Shows a checkpoint or cache that cannot be read as one error line that names it and
    says how to restore it, in place of a traceback (decorates a page's render)."""
    try:
        yield
    except (zoo.CheckpointError, cache.CorruptCacheError) as err:
        st.error(str(err))


@st.cache_resource(show_spinner="Reading the validation split…")
def val_split() -> data.Split | None:
    """The validation split, or None when CIFAR-10 is absent."""
    try:
        return data.get_split("val")
    except data.DatasetNotFoundError:
        return None


@st.cache_resource(show_spinner="Loading model…")
def system(name: str):
    return zoo.load_system(name)


@st.cache_resource(show_spinner=False)
def outputs(name: str) -> cache.CachedOutputs | None:
    """A system's cached validation outputs; built under a progress bar if missing."""
    split = val_split()
    if split is None:  # shipped caches still work without the images
        return cache.find(name, "val", zoo.checkpoint_sha(name))
    text = f"Caching {name}'s outputs on the {len(split)} validation images (once per checkpoint)…"
    bars = []

    def show(done: float) -> None:
        if not bars:
            bars.append(st.progress(0.0, text=text))
        bars[0].progress(done, text=text)

    try:
        return zoo.outputs(name, split, model=lambda: system(name), progress=False,
                           on_progress=show)
    finally:
        for bar in bars:
            bar.empty()


LIVE_SYSTEMS = 8   # at most this many live systems are kept; the least recently used goes


@st.cache_resource(show_spinner="Preparing the live model (calibrating the sparse path)…",
                   max_entries=LIVE_SYSTEMS)
def live_system(name: str, policy_json: str | None) -> live.LiveSystem:
    _allocator_tuned()
    pol = P.Policy.from_json(policy_json) if policy_json else None
    return live.build(name, pol, model=system(name))


@st.cache_resource(show_spinner="Timing every stage…", max_entries=LIVE_SYSTEMS)
def stage_latency(name: str) -> tuple[list[float], float]:
    return runtime.stage_seconds(runtime.fold(system(name)), batch_size=1)


def halves(name: str, metric: str) -> tuple[P.StageOutputs, P.StageOutputs]:
    cached = outputs(name)
    fit, check = cached.half("fit"), cached.half("check")
    if metric == "latency":
        per_stage, dense = stage_latency(name)
        fit, check = (budget.latency_costs(o, per_stage, dense) for o in (fit, check))
    return fit, check


@st.cache_data(show_spinner=False)
def reference_accuracy(half: str) -> float | None:
    """``zoo.REFERENCE``'s accuracy on a half of the validation split (the loss budgets are
    measured against it), or None when its outputs are not there."""
    cached = outputs(zoo.REFERENCE)
    return None if cached is None else float(cached.half(half).correct[:, -1].mean())


@st.cache_data(show_spinner=False, max_entries=64)
def shipped_percent(name: str, metric: str) -> int | None:
    """The budget (whole % of the dense cost, in ``metric``) of the system's shipped
    ≤0.5%-loss operating point, or None when none is shipped."""
    policy = operating_points.load_policy(name, operating_points.LOSSES[0])
    return None if policy is None else budget.start_percent(policy, halves(name, metric)[0])


@st.cache_data(show_spinner="Sweeping the trade-off…", max_entries=64)
def curves(name: str, family: str, feature: str, topology: str, metric: str) -> budget.Curves:
    fit, check = halves(name, metric)
    return budget.curves(fit, check, budget.BudgetQuery(family, feature, topology))


@st.cache_data(show_spinner=False, max_entries=64)
def class_specific_block(name: str) -> int:
    """Where the Galleries page's block picker starts for a gated system."""
    return gallery.most_class_specific_block(outputs(name))


def start_index(names: list[str]) -> int:
    """Where a system picker over ``names`` starts: the featured system, else the first
    dynamic one (a static network has no compute path to show), else the first."""
    for candidates in ([zoo.FEATURED], zoo.dynamic(names)):
        for name in candidates:
            if name in names:
                return names.index(name)
    return 0


def missing_systems_message() -> str:
    lines = [f"- **{name}**: `{zoo.train_command(zoo.missing(name)[0])}`"
             for name in zoo.SYSTEMS if zoo.missing(name)]
    return "Systems still to train:\n" + "\n".join(lines)
