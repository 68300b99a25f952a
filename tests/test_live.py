"""A live system shared by many sessions: threads inspecting different images through one
``LiveSystem`` each get what a sequential run gives them."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from dynviz import live

TIMINGS = ("ms_dynamic", "ms_dense")


def _answer(result: live.InspectResult) -> dict:
    """What an inspection says about the image, without its timings."""
    summary = {k: v for k, v in result.summary().items() if k not in TIMINGS}
    return summary | {"probs": result.probs.round(6).tolist()}


@pytest.mark.parametrize("name", ["lcnet_resnet20", "cascade_r8_r20_r56"])
def test_eight_threads_through_one_live_system_get_their_sequential_answers(app_env, ws, name):
    system = live.build(ws, name)
    images = [np.asarray(img) for img in app_env.images()[:8]]
    expected = [_answer(live.inspect_image(system, img, timing_repeats=1)) for img in images]
    assert len({str(a) for a in expected}) > 1            # the images get different answers
    got = [None] * len(images)
    errors = []
    start = threading.Barrier(len(images))

    def work(i):
        try:
            start.wait()
            for _ in range(3):
                got[i] = _answer(live.inspect_image(system, images[i], timing_repeats=1))
        except Exception as err:                          # reported below, with its thread
            errors.append((i, err))
    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(images))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert got == expected
