"""The compute path of one image drawn as the papers draw it: arrays in, ``go.Figure`` out.

A network is a chain of blocks grouped by stage (``layer1.0`` … ``layer3.8``); a staged
system is a chain of stages with an exit branch under every early one. Every drawn element
a test or a reader needs to find carries its numbers: the block markers' ``customdata`` is
``[name, S_L, channel share]`` (trace ``"ran"`` or ``"skipped"``), the exit branches'
``[stage, score, threshold, decision]`` (trace ``"exits"``), and the place the image left is
the one point of trace ``"left here"``.
"""
from __future__ import annotations

import base64
from html import escape

import numpy as np
import plotly.graph_objects as go

from dynviz.plots import ON, _layout

SKIP = "#d62728"     # the skip arc over a block that did not run
FADED = "#bdbdbd"
LEFT = "#2ca02c"     # where the image left
GROUP_GAP = 0.8      # extra space between two stages of blocks (block pitch: 1)
DECISIONS = {-1: "not reached", 0: "continue", 1: "exit", 2: "jump to last"}


def _positions(names: list[str]) -> tuple[np.ndarray, list[str]]:
    """x of every block (pitch 1, a gap between groups) and its group (``layer2`` of
    ``layer2.3``; a name without a dot is its own group)."""
    groups = [n.rsplit(".", 1)[0] if "." in n else n for n in names]
    x, pos = [], 0.0
    for i, g in enumerate(groups):
        if i and g != groups[i - 1]:
            pos += GROUP_GAP
        x.append(pos)
        pos += 1
    return np.asarray(x), groups


def _block_trace(name: str, x, customdata, symbol: str, color: str) -> go.Scatter:
    return go.Scatter(
        x=x, y=[0.5] * len(x), mode="markers", name=name, customdata=customdata,
        marker=dict(symbol=symbol, size=9, color=color),
        hovertemplate=("%{customdata[0]}: " + name + "<br>S_L = %{customdata[1]:.3f}"
                       "<br>channels computed: %{customdata[2]:.0%}<extra></extra>"))


def block_chain(block_scores: np.ndarray, channel_share: np.ndarray, names: list[str],
                title: str) -> go.Figure:
    """Blocks left to right in their stages. A block that ran is a box filled with opacity
    S_L up to the height of the share of its channels computed (the outline is the whole
    block); a skipped one (S_L = 0) is a faded dashed outline with the skip arc over it.

    Args:
        block_scores: (n_blocks,) S_L; 0 means skipped.
        channel_share: (n_blocks,) the fraction of each block's channels computed.
        names: the blocks' names, ``stage.index``.
    """
    x, groups = _positions(names)
    ran = block_scores > 0
    fig, shapes, notes = go.Figure(), [], []   # layout items set once: add_shape is slow
    shapes.append(dict(type="line", x0=x[0] - 0.8, x1=x[-1] + 0.8, y0=0.5, y1=0.5, layer="below",
                  line=dict(color="#7f7f7f", width=1.5)))   # the data flow
    for g in dict.fromkeys(groups):
        xs = x[[i for i, h in enumerate(groups) if h == g]]
        shapes.append(dict(type="rect", x0=xs[0] - 0.5, x1=xs[-1] + 0.5, y0=-0.15, y1=1.15,
                      layer="below", fillcolor="#f4f6fa", line=dict(width=0)))
        notes.append(dict(x=(xs[0] + xs[-1]) / 2, y=-0.25, text=g, showarrow=False,
                           yanchor="top"))
    for xi, s, share, on, name in zip(x, block_scores, channel_share, ran, names):
        shapes.append(dict(type="rect", x0=xi - 0.38, x1=xi + 0.38, y0=0, y1=1,
                           name=f"outline:{name}", fillcolor="white",
                           line=dict(color=ON if on else FADED, width=1,
                                     dash="solid" if on else "dot")))
        if on:
            shapes.append(dict(type="rect", x0=xi - 0.38, x1=xi + 0.38, y0=0, y1=float(share),
                          name=f"ran:{name}", fillcolor=ON, opacity=float(np.clip(s, 0.1, 1)),
                          line=dict(width=0)))
        else:   # the identity path taken instead: an arc from the block's input to its output
            shapes.append(dict(type="path", name=f"skip:{name}", line=dict(color=SKIP, width=2),
                          path=f"M {xi - 0.5},0.5 Q {xi},1.9 {xi + 0.5},0.5"))
    cells = np.column_stack([np.asarray(names, object), block_scores.astype(float),
                             channel_share.astype(float)])
    fig.add_trace(_block_trace("ran", x[ran], cells[ran], "circle", ON))
    fig.add_trace(_block_trace("skipped", x[~ran], cells[~ran], "x-thin-open", SKIP))
    fig.update_layout(shapes=shapes, annotations=notes)
    return _layout(fig, title, height=260, showlegend=False, plot_bgcolor="white",
                   xaxis=dict(visible=False, range=[x[0] - 1, x[-1] + 1]),
                   yaxis=dict(visible=False, range=[-0.7, 1.6]))


def channel_share(block_scores: np.ndarray, channel_scores: list[np.ndarray]) -> np.ndarray:
    """(n_blocks,) the fraction of each block's channels computed (0 for a skipped block)."""
    return np.array([(c > 0).mean() if s > 0 and c.size else float(s > 0)
                     for s, c in zip(block_scores, channel_scores)])


def gated(block_scores: np.ndarray, channel_scores: list[np.ndarray],
          names: list[str]) -> go.Figure:
    """The path of a gated network: S_L (n_blocks,) and per block its S_C (C_mid,)."""
    share = channel_share(block_scores, channel_scores)
    ran = int((block_scores > 0).sum())
    computed = sum(int((c > 0).sum()) for s, c in zip(block_scores, channel_scores) if s > 0)
    total = sum(len(c) for c in channel_scores)
    title = (f"Compute path: {ran} of {len(names)} blocks ran, {len(names) - ran} skipped "
             f"(red arcs); {computed / total:.0%} of the channels computed")
    return block_chain(np.asarray(block_scores, float), share, names, title)


def static(names: list[str]) -> go.Figure:
    """A static network: every block runs, every channel; ``names`` empty for a network
    whose blocks are unknown (an exported program), drawn as one box."""
    names = names or ["network"]
    ones = np.ones(len(names))
    return block_chain(ones, ones, names, f"Compute path: static, all {len(names)} "
                       f"block{'s' if len(names) > 1 else ''} run for every image")


def _reached(decisions: np.ndarray, exit_stage: int) -> np.ndarray:
    """(K,) which stages ran: those that decided, and the one the image left at (after a
    jump, the last stage answers without a decision of its own)."""
    reached = np.asarray(decisions) != -1
    reached[exit_stage] = True
    return reached


def staged(stage_names: list[str], scores: np.ndarray, thresholds: np.ndarray,
           decisions: np.ndarray, exit_stage: int, jumped: bool, score_name: str,
           stage_macs: np.ndarray) -> go.Figure:
    """Stages left to right, an exit branch under every early one with its score against
    the policy's threshold (leave iff score >= threshold); stages not reached faded; a star
    where the image left; a jump drawn as an arc over the stages it passed by.

    Args:
        scores, thresholds: (K-1,) per early stage.
        decisions: (K,) ``adaptive`` NOT_REACHED/CONTINUE/EXIT/JUMP.
        stage_macs: (K,) MACs this image spent in each stage (0 where not run).
    """
    k = len(stage_names)
    x = np.arange(k) * 2.0
    reached = _reached(decisions, exit_stage)
    fig, shapes, notes = go.Figure(), [], []   # layout items set once: add_shape is slow
    shapes.append(dict(type="line", x0=x[0] - 1.2, x1=x[-1] + 1.2, y0=1, y1=1, layer="below",
                  line=dict(color="#7f7f7f", width=1.5)))
    for i, name in enumerate(stage_names):
        on = bool(reached[i])
        shapes.append(dict(type="rect", x0=x[i] - 0.6, x1=x[i] + 0.6, y0=0.7, y1=1.3,
                      name=f"stage:{name}", fillcolor=ON if on else "white",
                      opacity=1 if on else 0.5,
                      line=dict(color=ON if on else FADED, dash="solid" if on else "dot")))
        notes.append(dict(x=x[i], y=1, showarrow=False, text=f"<b>{name}</b>",
                           font=dict(color="white" if on else "#7f7f7f")))
        if on:
            notes.append(dict(x=x[i], y=1.4, showarrow=False, yanchor="bottom",
                               text=f"{stage_macs[i] / 1e6:.1f} M MACs"))
    cells = []
    for i in range(k - 1):     # the last stage has no exit decision: it always answers
        shapes.append(dict(type="line", x0=x[i], x1=x[i], y0=0.7, y1=0.1,
                           name=f"branch:{stage_names[i]}",
                           line=dict(color=ON if reached[i] else FADED,
                                     dash="solid" if reached[i] else "dot")))
        cells.append([stage_names[i], float(scores[i]), float(thresholds[i]),
                      DECISIONS[int(decisions[i])]])
        if reached[i]:
            sign = "≥" if scores[i] >= thresholds[i] else "<"
            notes.append(dict(x=x[i], y=-0.05, yanchor="top", showarrow=False,
                              text=f"{scores[i]:.3f} {sign} θ {thresholds[i]:.3f}"
                                   f"<br>{DECISIONS[int(decisions[i])]}"))
    if cells:
        fig.add_trace(go.Scatter(
            x=x[:-1], y=[0.1] * (k - 1), mode="markers", name="exits", customdata=cells,
            marker=dict(symbol="triangle-down", size=14,
                        color=[LEFT if i == exit_stage else (ON if reached[i] else FADED)
                               for i in range(k - 1)]),
            hovertemplate=("%{customdata[0]} exit<br>" + score_name + " %{customdata[1]:.3f}"
                           "<br>threshold %{customdata[2]:.3f} (leave at or above)"
                           "<br>%{customdata[3]}<extra></extra>")))
    if jumped:
        shapes.append(dict(type="path", name="jump", line=dict(color=LEFT, width=2, dash="dash"),
                      path=f"M {x[0] + 0.6},1.2 Q {(x[0] + x[-1]) / 2},2.2 {x[-1] - 0.6},1.2"))
    last = exit_stage == k - 1
    left_x, left_y = (x[-1] + 1.2, 1.0) if last else (x[exit_stage], 0.1)
    fig.add_trace(go.Scatter(
        x=[left_x], y=[left_y], mode="markers+text", name="left here",
        customdata=[[stage_names[exit_stage]]], text=["left here"],
        textposition="middle right" if last else "middle left",
        marker=dict(symbol="star", size=20, color=LEFT),
        hovertemplate="left at %{customdata[0]}<extra></extra>"))
    title = (f"Compute path: left at {stage_names[exit_stage]}"
             f"{' (jumped to the last)' if jumped else ''}; exits compare {score_name} with "
             "the policy's threshold θ")
    fig.update_layout(shapes=shapes, annotations=notes)
    return _layout(fig, title, height=300, showlegend=False, plot_bgcolor="white",
                   xaxis=dict(visible=False, range=[x[0] - 1.5, x[-1] + 2.6]),
                   yaxis=dict(visible=False, range=[-0.9, 2.3]))


# ---- sketches: the same drawings at the size of a table cell, as SVG data URLs ----------
SKETCH_HEIGHT = 24   # px; a cell shows it scaled to its row
SKETCH_PITCH = 5     # px per block (per stage: 4 pitches): resnet56 fits a 200 px cell
DOTTED = ' stroke-dasharray="1.5 1"'


def _svg(width: float, body: list[str]) -> str:
    return ('<svg xmlns="http://www.w3.org/2000/svg" '
            f'width="{width:.0f}" height="{SKETCH_HEIGHT}" viewBox="0 0 {width:.0f} '
            f'{SKETCH_HEIGHT}">' + "".join(body) + "</svg>")


def sketch_static(names: list[str]) -> str:
    """``static`` as a small SVG (``sketch_blocks`` with every block run whole)."""
    names = names or ["network"]
    ones = np.ones(len(names))
    return sketch_blocks(ones, ones, names)


def sketch_blocks(block_scores: np.ndarray, channel_share: np.ndarray,
                  names: list[str]) -> str:
    """``block_chain`` as a small SVG: a box per block (at least one), filled with opacity
    S_L up to the share of its channels computed; a skipped block's box dotted under a red
    arc. Every box carries ``data-block`` and the class ``ran`` or ``skipped``."""
    x, _ = _positions(names)
    px = (x + 0.5) * SKETCH_PITCH
    top, bottom = 8, SKETCH_HEIGHT - 2
    half = 0.38 * SKETCH_PITCH
    body = [f'<line x1="0" x2="{px[-1] + SKETCH_PITCH:.1f}" y1="{(top + bottom) / 2}" '
            f'y2="{(top + bottom) / 2}" stroke="#7f7f7f" stroke-width="1"/>']
    for xi, s, share, name in zip(px, block_scores, channel_share, names):
        on = s > 0
        body.append(f'<rect class="{"ran" if on else "skipped"}" data-block="{escape(name)}" '
                    f'x="{xi - half:.1f}" y="{top}" width="{2 * half:.1f}" '
                    f'height="{bottom - top}" fill="white" stroke="{ON if on else FADED}" '
                    f'stroke-width="0.8"{"" if on else DOTTED}/>')
        if on:
            h = (bottom - top) * float(share)
            body.append(f'<rect x="{xi - half:.1f}" y="{bottom - h:.1f}" '
                        f'width="{2 * half:.1f}" height="{h:.1f}" fill="{ON}" '
                        f'fill-opacity="{float(np.clip(s, 0.1, 1)):.2f}"/>')
        else:
            step = SKETCH_PITCH / 2
            body.append(f'<path d="M {xi - step:.1f} {(top + bottom) / 2} Q {xi:.1f} '
                        f'{top - 8} {xi + step:.1f} {(top + bottom) / 2}" fill="none" '
                        f'stroke="{SKIP}" stroke-width="1.2"/>')
    return _svg(px[-1] + SKETCH_PITCH, body)


def sketch_stages(stage_names: list[str], decisions: np.ndarray, exit_stage: int,
                  jumped: bool) -> str:
    """``staged`` as a small SVG: a box per stage, filled where the image reached it, dotted
    where not, a green dot (class ``left``, ``data-stage``) where it left, a dashed arc for a
    jump. Every box carries ``data-stage`` and the class ``reached`` or ``not-reached``."""
    pitch = 4 * SKETCH_PITCH
    mid = SKETCH_HEIGHT / 2
    body = [f'<line x1="0" x2="{pitch * len(stage_names):.0f}" y1="{mid}" y2="{mid}" '
            'stroke="#7f7f7f" stroke-width="1"/>']
    for i, (name, on) in enumerate(zip(stage_names, _reached(decisions, exit_stage))):
        body.append(f'<rect class="{"reached" if on else "not-reached"}" '
                    f'data-stage="{escape(name)}" x="{i * pitch + 3}" y="{mid - 6}" '
                    f'width="{pitch - 8}" height="12" '
                    f'fill="{ON if on else "white"}" stroke="{ON if on else FADED}" '
                    f'stroke-width="0.8"{"" if on else DOTTED}/>')
    if jumped:
        body.append(f'<path d="M {pitch - 5} {mid - 6} Q {pitch * len(stage_names) / 2:.0f} 0 '
                    f'{pitch * (len(stage_names) - 1) + 3} {mid - 6}" fill="none" '
                    f'stroke="{LEFT}" stroke-width="1.2" stroke-dasharray="3 2"/>')
    body.append(f'<circle class="left" data-stage="{escape(stage_names[exit_stage])}" '
                f'cx="{exit_stage * pitch + pitch - 3}" cy="{mid}" r="3" fill="{LEFT}"/>')
    return _svg(pitch * len(stage_names) + 4, body)


def data_url(svg: str) -> str:
    """An SVG as a data URL (what a table's image column shows)."""
    return "data:image/svg+xml;base64," + base64.b64encode(svg.encode()).decode()
