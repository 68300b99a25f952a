"""Pure plotly figure builders: arrays in, ``go.Figure`` out (no Streamlit, no I/O)."""
from __future__ import annotations

import numpy as np
import plotly.graph_objects as go

OFF = "#d9d9d9"
ON = "#1f77b4"
HEIGHT = 300


def _layout(fig: go.Figure, title: str, height: int = HEIGHT, **kw) -> go.Figure:
    fig.update_layout(title=title, height=height, margin=dict(l=40, r=20, t=40, b=40), **kw)
    return fig


def top_k(probs: np.ndarray, classes: tuple[str, ...], k: int = 5) -> go.Figure:
    """The ``k`` most probable of ``classes`` (``probs``: (C,)), the likeliest on top."""
    order = np.argsort(-probs)[:k][::-1]
    fig = go.Figure(go.Bar(x=probs[order], y=[classes[i] for i in order], orientation="h",
                           text=[f"{probs[i]:.1%}" for i in order], textposition="auto"))
    return _layout(fig, f"Top {k}", height=220, xaxis=dict(range=[0, 1], tickformat=".0%"))


def block_strip(scores: np.ndarray, names: list[str]) -> go.Figure:
    """S_L per block; skipped blocks (S_L = 0) grey."""
    colors = [ON if s > 0 else OFF for s in scores]
    fig = go.Figure(go.Bar(x=names, y=np.where(scores > 0, scores, 0.02), marker_color=colors,
                           customdata=scores,
                           hovertemplate="%{x}: S_L = %{customdata:.3f}<extra></extra>"))
    ran = int((scores > 0).sum())
    return _layout(fig, f"Blocks: {ran} of {len(scores)} ran (grey = skipped)", height=240,
                   yaxis=dict(range=[0, 1.05], title="S_L"), xaxis=dict(tickangle=-60))


def channel_heatmap(channel_scores: list[np.ndarray], block_scores: np.ndarray,
                    names: list[str]) -> go.Figure:
    """Blocks × channels of S_C; channels that did not run are blank."""
    width = max(len(s) for s in channel_scores)
    z = np.full((len(channel_scores), width), np.nan)
    for i, s in enumerate(channel_scores):
        if block_scores[i] > 0:
            z[i, :len(s)] = np.where(s > 0, s, np.nan)
    fig = go.Figure(go.Heatmap(z=z, y=names, colorscale="Blues", zmin=0, zmax=1,
                               colorbar=dict(title="S_C"),
                               hovertemplate="%{y} ch %{x}: %{z:.3f}<extra></extra>"))
    ran = np.isfinite(z).sum()
    return _layout(fig, f"Channels: {ran} computed (blank = not computed)",
                   height=max(300, 14 * len(names)), xaxis=dict(title="channel"),
                   yaxis=dict(autorange="reversed"))


def stage_path(stage_names: list[str], scores: np.ndarray, thresholds: np.ndarray,
               decisions: np.ndarray, exit_stage: int, score_name: str) -> go.Figure:
    """At every early stage reached, the score the policy's exit decision compares with its
    threshold (leave iff score >= threshold), and the decision taken. Stages with no score
    (not reached, or the last, which decides nothing) get no bar, only their label."""
    labels = {-1: "not reached", 0: "continue", 1: "exit", 2: "jump to last"}
    y = np.append(np.asarray(scores, dtype=float), np.nan)     # the last stage: no score
    has_bar = np.isfinite(y) & (np.asarray(decisions) != -1)
    colors = ["#2ca02c" if i == exit_stage else ON for i in range(len(stage_names))]
    fig = go.Figure(go.Bar(
        x=stage_names, y=[float(v) if bar else None for v, bar in zip(y, has_bar)],
        marker_color=colors, name=score_name, textposition="outside",
        text=[labels[int(d)] if bar else "" for d, bar in zip(decisions, has_bar)],
        hovertemplate="%{x}: %{y:.3f}<extra></extra>"))
    for i, (name, bar) in enumerate(zip(stage_names, has_bar)):
        if not bar:
            exited = i == exit_stage
            fig.add_annotation(x=name, y=0, yanchor="bottom", showarrow=False,
                               text=labels[int(decisions[i])],
                               font=dict(color="#2ca02c" if exited else "#7f7f7f"))
    finite = np.isfinite(thresholds)
    fig.add_trace(go.Scatter(
        x=[n for n, f in zip(stage_names, finite) if f], y=thresholds[finite], mode="markers",
        name="threshold (leave at or above)",
        marker=dict(symbol="line-ew-open", size=28, color="#d62728", line=dict(width=3)),
        hovertemplate="%{x}: threshold %{y:.3f}<extra></extra>"))
    return _layout(fig, f"Stages: left at {stage_names[exit_stage]} (green)", height=280,
                   yaxis=dict(title=score_name), showlegend=False)


def frontier(curves: dict[str, tuple[np.ndarray, np.ndarray]],
             points: dict[str, tuple[float, float]], x_title: str) -> go.Figure:
    """Accuracy vs cost: named curves (x, y) and named single points."""
    fig = go.Figure()
    for name, (x, y) in curves.items():
        fig.add_trace(go.Scatter(x=x, y=y, mode="lines+markers", name=name,
                                 marker=dict(size=4)))
    symbols = iter(["star", "diamond", "square", "x", "triangle-up", "circle", "cross"])
    for name, (x, y) in points.items():
        fig.add_trace(go.Scatter(x=[x], y=[y], mode="markers", name=name,
                                 marker=dict(size=13, symbol=next(symbols, "circle"))))
    return _layout(fig, "Accuracy vs cost", height=420, xaxis=dict(title=x_title),
                   yaxis=dict(title="accuracy", tickformat=".1%"),
                   legend=dict(orientation="h", y=-0.25))


def exit_histogram(stage_names: list[str], counts: list[int], jumped: int = 0) -> go.Figure:
    fig = go.Figure(go.Bar(x=stage_names, y=counts))
    title = "Where images leave" + (f" ({jumped} jumped to the last)" if jumped else "")
    return _layout(fig, title, height=260, yaxis=dict(title="images"))


def class_firing(rates: np.ndarray, classes: tuple[str, ...], block_name: str) -> go.Figure:
    """(classes, channels) firing rates of one block (LC-Net Fig. 7), a row per class."""
    fig = go.Figure(go.Heatmap(z=rates, y=list(classes), colorscale="Viridis", zmin=0,
                               zmax=1, colorbar=dict(title="fires"),
                               hovertemplate="%{y} ch %{x}: %{z:.0%}<extra></extra>"))
    return _layout(fig, f"Channel firing rate per class, {block_name}", height=380,
                   xaxis=dict(title="channel"))


def class_cost(costs: np.ndarray, classes: tuple[str, ...], reference: float) -> go.Figure:
    """Mean cost per class (``costs``: (C,)) as a fraction of the reference."""
    fig = go.Figure(go.Bar(x=list(classes), y=costs / reference,
                           hovertemplate="%{x}: %{y:.1%} of the reference<extra></extra>"))
    return _layout(fig, "Mean cost per class", height=300,
                   yaxis=dict(title="MACs / reference", tickformat=".0%"))
