"""Budget: slide the time/accuracy trade-off; every move re-learns the policy on the fit
half and judges it on the check half."""
from __future__ import annotations

import streamlit as st

from dynviz import budget, data, operating_points, plots, policy as P, zoo
from dynviz.ui import share, state
from dynviz.workspace import Workspace

METRICS = {"MACs": "macs", "measured latency (batch 1)": "latency"}


@state.broken_files_shown()
def render() -> None:
    st.title("Budget")
    ws = state.workspace()
    if not zoo.staged(ws, list(ws.systems)):
        st.info(f"The workspace {ws.name} has no early-exit or cascade system: the budget "
                f"trades the cost of the stages a policy runs.")
        return
    staged = zoo.staged(ws, zoo.available(ws))
    if not staged:
        st.info("No early-exit or cascade system is trained yet.\n\n"
                + state.missing_systems_message(ws))
        return
    link = share.arrived("budget")
    if link is not None:    # a link just opened: its view, before the widgets are drawn
        share.apply(share.parse_budget(link, staged))
    c1, c2, c3, c4 = st.columns(4)
    name = c1.selectbox("System", staged, key="budget_system")
    if st.session_state.get("budget_kind_for") != name:
        # a system just chosen: start with the kind of policy it ships
        shipped = operating_points.load_policy(ws, name, operating_points.LOSSES[0])
        st.session_state["budget_family"] = shipped.family if shipped else "threshold"
        st.session_state["budget_feature"] = shipped.feature if shipped else "max_prob"
        st.session_state["budget_kind_for"] = name
    family = c2.selectbox("Policy family", P.FAMILIES, key="budget_family")
    feature = c3.selectbox("Feature", P.FEATURES, key="budget_feature",
                           disabled=family != "threshold")
    metric = METRICS[c4.selectbox("Cost", list(METRICS), key="budget_metric")]
    if state.outputs(ws, name) is None:
        st.warning("This system's validation outputs are not cached and the dataset is "
                   "absent: \n\n" + data.missing_data_message(ws.data))
        return
    panel(ws, name, family, feature, ws.spec(name).topology, metric)


@st.fragment
@state.broken_files_shown()
def panel(ws: Workspace, name: str, family: str, feature: str, topology: str,
          metric: str) -> None:
    shipped = state.shipped_percent(ws, name, metric)
    if st.session_state.get("budget_slider_for") != (name, metric):
        # a system (or cost) just chosen: start at its shipped ≤0.5%-loss operating point
        st.session_state["budget_slider"] = shipped or 50
        st.session_state["budget_slider_for"] = (name, metric)
    if "budget_from_link" in st.session_state:
        st.session_state["budget_slider"] = st.session_state.pop("budget_from_link")
    clicked = clicked_budget()
    if clicked is not None:     # a point of the frontier clicked: the slider goes there
        st.session_state["budget_slider"] = clicked
    percent = st.slider("Budget: mean cost, % of the dense network", *share.BUDGET_RANGE, step=1,
                        key="budget_slider",
                        help=None if shipped is None else
                        f"Starts at {shipped}%, what the shipped operating point within 0.5% "
                        f"of {ws.reference}'s accuracy spends on the fit half. Each position "
                        f"re-learns the most accurate policy on fit within its budget, which "
                        f"can differ a little from the shipped one (the cheapest within the "
                        f"loss).")
    share.write("budget", {"system": name, "budget": str(percent)})
    query = budget.BudgetQuery(family, feature, topology, percent / 100)
    fit, check = state.halves(ws, name, metric)
    result = budget.solve(fit, check, query)
    cols = st.columns(5)
    for col, half, summary in ((cols[0], "check", result.check), (cols[1], "fit", result.fit)):
        # the loss budgets are in points of the reference's accuracy on the same half
        ref = state.reference_accuracy(ws, half)
        col.metric(f"Accuracy ({half})", f"{summary['accuracy']:.2%}",
                   None if ref is None else
                   f"{(summary['accuracy'] - ref) * 100:+.2f} pt vs {ws.reference}",
                   delta_arrow="off",
                   help=None if ref is None else f"{ws.reference}: {ref:.2%} on the {half} half")
    unit = "M" if metric == "macs" else "ms"
    scale = 1e-6 if metric == "macs" else 1e3
    cols[2].metric("Mean cost (check)", f"{result.check['cost_mean'] * scale:.1f} {unit}",
                   f"{result.check['cost_fraction']:.0%} of dense", delta_color="off",
                   delta_arrow="off",
                   help="MACs per image (M = millions)" if metric == "macs"
                   else "measured milliseconds per image at batch 1")
    # with MACs as the cost this is a MAC ratio, not a speedup: time is only ever measured
    cols[3].metric("MAC reduction (check)" if metric == "macs" else "Speedup (check)",
                   f"{result.check['reduction']:.2f}×",
                   help="dense network's mean MACs / this policy's" if metric == "macs"
                   else "dense network's measured batch-1 time / this policy's")
    cols[4].metric("Refit", f"{result.refit_ms:.1f} ms")
    c = state.curves(ws, name, family, feature, topology, metric)
    points = {"oracle": c.oracle} | c.statics | {
        "this policy (fit)": (result.fit["cost_fraction"], result.fit["accuracy"]),
        "this policy (check)": (result.check["cost_fraction"], result.check["accuracy"])}
    fig = plots.frontier({"learned policies (check)": c.learned,
                          "one global threshold (check)": c.baseline}, points,
                          "mean cost / dense network")
    left, right = st.columns([3, 2])
    left.plotly_chart(fig, key="budget_frontier", on_select="rerun", selection_mode="points")
    left.caption("Click a point to spend its cost: the slider moves there.")
    right.plotly_chart(plots.exit_histogram(list(fit.stage_names),
                                            result.check["exit_histogram"],
                                            result.check["jumped"]), key="budget_hist")
    st.session_state["budget_last"] = {"system": name, "check": result.check,
                                       "fit": result.fit, "budget": query.budget}
    b1, b2 = right.columns(2)
    b1.download_button("Download policy (JSON)", result.policy.to_json(),
                       file_name=f"{name}-policy.json", mime="application/json",
                       key="budget_download")
    if b2.button("Use this policy in Inspect", key="budget_use"):
        st.session_state.setdefault("budget_policy", {})[name] = result.policy.to_json()
        st.toast("Inspect will offer this policy as 'from the Budget page'.")


def clicked_budget() -> int | None:
    """The budget (whole %) of the frontier point just clicked, else None. A selection stays
    in the chart's state over reruns: only a new one moves the slider."""
    points = st.session_state.get("budget_frontier", {}).get("selection", {}).get("points")
    picked = tuple((p["curve_number"], p["point_index"]) for p in points or ())
    if picked == st.session_state.get("budget_clicked"):
        return None
    st.session_state["budget_clicked"] = picked     # () once deselected: a click again counts
    if not picked:
        return None
    return budget.whole_percent(points[0]["x"])


render()
