"""Figure builders: what is drawn follows the data handed in."""
from __future__ import annotations

import numpy as np
import pytest

from dynviz import plots
from dynviz.adaptive import CONTINUE, EXIT, JUMP, NOT_REACHED

NAMES = ["r8", "r20", "r56"]


@pytest.mark.parametrize("decisions, scores, exit_stage", [
    ([CONTINUE, EXIT, NOT_REACHED], [0.41, 0.93], 1),            # leaves at the middle stage
    ([CONTINUE, CONTINUE, EXIT], [0.30, 0.55], 2),              # runs to the last
    ([JUMP, NOT_REACHED, EXIT], [0.12, np.nan], 2),             # jumps past the middle
])
def test_stage_path_draws_a_bar_only_for_a_decision_score(decisions, scores, exit_stage):
    fig = plots.stage_path(NAMES, np.array(scores), np.array([0.5, 0.8]),
                           np.array(decisions), exit_stage, "max prob")
    bars = fig.data[0]
    # a stage has a bar iff it was reached and is not the last (which decides nothing)
    expected = [scores[i] if i < len(scores) and d != NOT_REACHED else None
                for i, d in enumerate(decisions)]
    assert list(bars.y) == expected
    labels = {NOT_REACHED: "not reached", CONTINUE: "continue", EXIT: "exit",
              JUMP: "jump to last"}
    shown = {a.x: a.text for a in fig.layout.annotations}
    for i, (name, d) in enumerate(zip(NAMES, decisions)):
        text = bars.text[i] if expected[i] is not None else shown[name]
        assert text == labels[d]
    assert len(shown) == expected.count(None)
    # the stage the image left at is the green one, bar or label
    green = "#2ca02c"
    if expected[exit_stage] is None:
        assert fig.layout.annotations[list(shown).index(NAMES[exit_stage])].font.color == green
    else:
        assert bars.marker.color[exit_stage] == green
