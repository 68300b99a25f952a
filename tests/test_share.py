"""Shareable views: the URL parsers (pure) and the pages opened with a link (AppTest)."""
from __future__ import annotations

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from dynviz import budget, settings, zoo
from dynviz.ui import share

SYSTEMS = ("resnet20", "lcnet_resnet20", "exits_resnet56")
COUNTS = {"cat": 3, "dog": 1}


@pytest.mark.parametrize("params, values", [
    ({}, {}),
    ({"system": "exits_resnet56"}, {"inspect_system": "exits_resnet56"}),
    ({"system": "resnet20", "class": "cat", "index": "2"},
     {"inspect_system": "resnet20", "inspect_source": "A validation image",
      "inspect_class": "cat", "inspect_index": 2}),
    ({"class": "dog"}, {"inspect_source": "A validation image", "inspect_class": "dog",
                        "inspect_index": 0}),
    ({"class": "cat", "index": "1.0"}, {"inspect_source": "A validation image",
                                        "inspect_class": "cat", "inspect_index": 1}),
])
def test_inspect_link_good(params, values):
    view = share.parse_inspect(params, SYSTEMS, COUNTS)
    assert view.values == values and view.notes == ()


@pytest.mark.parametrize("params, kept, named", [
    ({"system": "resnet999"}, {}, "system='resnet999'"),
    ({"system": "resnet20", "class": "foo"}, {"inspect_system": "resnet20"}, "class='foo'"),
    ({"class": "cat", "index": "3"}, {"inspect_source": "A validation image",
                                      "inspect_class": "cat", "inspect_index": 0},
     "index='3'"),                                                  # cat has 3: 0, 1, 2
    ({"class": "cat", "index": "-1"}, {"inspect_source": "A validation image",
                                       "inspect_class": "cat", "inspect_index": 0}, "'-1'"),
    ({"class": "cat", "index": "x1"}, {"inspect_source": "A validation image",
                                       "inspect_class": "cat", "inspect_index": 0}, "'x1'"),
    ({"class": "foo", "index": "1"}, {}, "class='foo'"),
    ({"class": "cat", "index": "nan"}, {"inspect_source": "A validation image",
                                        "inspect_class": "cat", "inspect_index": 0}, "nan"),
])
def test_inspect_link_unknown_or_malformed_keeps_the_default_and_says_so(params, kept, named):
    view = share.parse_inspect(params, SYSTEMS, COUNTS)
    assert view.values == kept
    assert any(named in note for note in view.notes), view.notes


def test_inspect_link_to_an_image_without_the_dataset_says_so():
    view = share.parse_inspect({"system": "resnet20", "class": "cat"}, SYSTEMS, None)
    assert view.values == {"inspect_system": "resnet20"}
    assert "dataset is absent" in view.notes[0]


@pytest.mark.parametrize("params, values, note", [
    ({"system": "exits_resnet56", "budget": "37"},
     {"budget_system": "exits_resnet56", "budget_from_link": 37}, None),
    ({"budget": "100"}, {"budget_from_link": 100}, None),
    ({"budget": "5.0"}, {"budget_from_link": 5}, None),
    ({"budget": "4"}, {}, "budget='4'"),
    ({"budget": "37.5"}, {}, "budget='37.5'"),
    ({"budget": "abc", "system": "nope"}, {}, "system='nope'"),
    ({"budget": "inf"}, {}, "budget='inf'"),
])
def test_budget_link(params, values, note):
    view = share.parse_budget(params, SYSTEMS)
    assert view.values == values
    assert (note is None and view.notes == ()) or any(note in n for n in view.notes)


def test_check_address_is_the_rank_in_inspects_check_half(app_env, ws):
    """Reference: the check split as the data layer makes it, and its images."""
    from dynviz import data

    labels = app_env.labels
    check = ws.split("check", app_env.dataset)
    images = data.load_images(app_env.dataset)
    for position in (0, 1, 2, 3, 57, 58, len(labels) - 1):
        k = share.check_address(labels, position)
        if position % 2 == 0:
            assert k is None
            continue
        members = np.flatnonzero(check.labels == labels[position])
        assert np.array_equal(images[check.indices[members[k]]],
                              images[app_env.indices[position]])


def test_whole_percent_rounds_up_within_the_slider():
    assert [budget.whole_percent(f) for f in (0.0, 0.3712, 0.37, 0.999, 1.7)] == \
        [5, 38, 37, 100, 100]


def _page(page: str, **params) -> AppTest:
    at = AppTest.from_file(str(settings.PROJECT_ROOT / "dynviz" / "ui" / f"{page}_page.py"),
                           default_timeout=120)
    for key, value in params.items():
        at.query_params[key] = value
    return at.run()


def _notes(at: AppTest) -> list[str]:
    return [i.value for i in at.info]


def test_inspect_opens_the_links_image_and_writes_changes_back(app_env, ws):
    at = _page("inspect", system="lcnet_resnet20", **{"class": "ship", "index": "2"})
    assert not at.exception and not at.error
    assert at.selectbox(key="inspect_system").value == "lcnet_resnet20"
    assert at.selectbox(key="inspect_class").value == "ship"
    assert at.slider(key="inspect_index").value == 2
    assert not _notes(at)
    at.slider(key="inspect_index").set_value(4).run()
    assert at.query_params["index"] == "4" and at.query_params["class"] == "ship"
    assert at.slider(key="inspect_index").value == 4        # the link does not pull it back
    at.selectbox(key="inspect_system").set_value("resnet20").run()
    assert at.query_params["system"] == "resnet20"


def test_inspect_malformed_link_shows_the_note_and_the_default(app_env, ws):
    names = zoo.available(ws)
    # the default by the rule, independently: the featured system, else the first dynamic one
    default = ws.featured if ws.featured in names else zoo.dynamic(ws, names)[0]
    assert _page("inspect").selectbox(key="inspect_system").value == default
    at = _page("inspect", system="nope", **{"class": "foo", "index": "zz"})
    assert not at.exception and not at.error
    assert at.selectbox(key="inspect_system").value == default
    notes = _notes(at)
    assert any("system='nope'" in n for n in notes) and any("class='foo'" in n for n in notes)
    assert at.selectbox(key="inspect_class").value == ws.data.classes[0]


def test_budget_opens_the_links_budget(app_env, ws):
    at = _page("budget", system="exits_resnet56", budget="63")
    assert not at.exception and not at.error
    assert at.selectbox(key="budget_system").value == "exits_resnet56"
    assert at.slider(key="budget_slider").value == 63
    assert at.session_state["budget_last"]["budget"] == 0.63
    at.slider(key="budget_slider").set_value(40).run()
    assert at.query_params["budget"] == "40"
    assert at.slider(key="budget_slider").value == 40


def test_budget_malformed_link_shows_the_note(app_env, ws):
    at = _page("budget", system="exits_resnet56", budget="12x")
    assert not at.exception and not at.error
    assert any("budget='12x'" in n for n in _notes(at))
    assert at.selectbox(key="budget_system").value == "exits_resnet56"
    shipped = at.session_state["budget_slider"]
    assert shipped == _page("budget", system="exits_resnet56").slider(key="budget_slider").value
