"""The recipe table: every recipe builds its model, a recipe that cannot run is refused when
it is written, and a workspace's ``[recipes.NAME]`` tables change a built-in recipe or say in
one line which key is wrong."""
from __future__ import annotations

import dataclasses

import pytest

from dynviz import recipes, workspace
from dynviz.recipes import RECIPES
from tests.helpers import workspace_toml

# a workspace of one's own
WORKSPACE = workspace_toml(
    ("kiwi", "emu", "moa"), 40,
    {"small": {"kind": "static", "model": "resnet8", "checkpoint": "resnet8"}},
    reference="small")

THEIRS = """
[recipes.theirs]
base = "lcnet_resnet56"
model = "lcnet_resnet18"
init_from = "their_resnet18"
epochs = 4
peak_lr = 1                 # an integer where the field is a float
model_args = { placement = "parallel" }
"""


def _workspace(tmp_path, recipes_text: str) -> workspace.Workspace:
    (tmp_path / workspace.FILE).write_text(WORKSPACE + recipes_text)
    return workspace.load(tmp_path)


def test_epochs_must_split_into_cycles():
    with pytest.raises(ValueError, match="use a multiple of"):
        dataclasses.replace(RECIPES["resnet8"], epochs=5, cycles=2)


def test_a_recipe_with_a_teacher_needs_a_distill_weight():
    with pytest.raises(ValueError, match="distill weight"):
        dataclasses.replace(RECIPES["resnet8"], teacher="resnet8")


def test_every_recipe_builds_its_model(ws):
    for name, recipe in RECIPES.items():
        model = recipe.build(ws.data)
        assert sum(p.numel() for p in model.parameters()) > 0, name
        if recipe.trainable:
            assert any(n.startswith(recipe.trainable) for n, _ in model.named_parameters()), name


def test_a_recipe_builds_for_the_workspaces_classes_and_size(tmp_path):
    ws = _workspace(tmp_path, "")
    model = RECIPES["resnet8"].build(ws.data)
    assert model.fc.out_features == 3 and model.cfg.input_size == 40


def test_the_built_in_workspace_has_the_built_in_recipes(ws):
    assert recipes.for_workspace(ws) == RECIPES


def test_a_workspace_recipe_is_its_base_with_the_fields_it_sets(tmp_path):
    known = recipes.for_workspace(_workspace(tmp_path, THEIRS))
    assert {k: v for k, v in known.items() if k != "theirs"} == RECIPES
    assert known["theirs"] == dataclasses.replace(
        RECIPES["lcnet_resnet56"], model="lcnet_resnet18", init_from="their_resnet18",
        epochs=4, peak_lr=1.0, model_args=(("placement", "parallel"),))
    assert type(known["theirs"].peak_lr) is float


@pytest.mark.parametrize("edit, named", [
    (lambda t: t.replace("epochs = 4", "epoch = 4"), "unknown key recipes.theirs.epoch"),
    (lambda t: t.replace('base = "lcnet_resnet56"\n', ""), "recipes.theirs.base is missing"),
    (lambda t: t.replace('base = "lcnet_resnet56"', 'base = "lcnet"'),
     "recipes.theirs.base = 'lcnet'"),
    (lambda t: t.replace("epochs = 4", 'epochs = "4"'), "recipes.theirs.epochs must be a"),
    (lambda t: t.replace("epochs = 4", "epochs = true"), "recipes.theirs.epochs must be a"),
    (lambda t: t.replace("epochs = 4", "epochs = 4\nbf16 = 1"), "recipes.theirs.bf16"),
    (lambda t: t.replace('model = "lcnet_resnet18"', 'model = "lcnet_resnet19"'),
     "recipes.theirs.model = 'lcnet_resnet19'"),
    (lambda t: t.replace("epochs = 4", "epochs = 5\ncycles = 2"), "recipes.theirs: 5 epochs"),
    (lambda t: t.replace('model_args = { placement = "parallel" }', 'model_args = "parallel"'),
     "recipes.theirs.model_args"),
    (lambda t: t.replace('placement = "parallel"', 'placment = "parallel"'),
     "recipes.theirs.model_args do not fit lcnet_resnet18"),
])
def test_a_malformed_recipe_is_one_line_naming_the_key(tmp_path, edit, named):
    ws = _workspace(tmp_path, edit(THEIRS))
    with pytest.raises(workspace.WorkspaceError) as err:
        recipes.for_workspace(ws)
    message = str(err.value)
    assert named in message and "\n" not in message and workspace.FILE in message


def test_train_offers_the_workspaces_recipes_and_refuses_others(tmp_path, capsys):
    from dynviz.cli import main

    _workspace(tmp_path, THEIRS)
    assert main(["--workspace", str(tmp_path), "train", "their"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("unknown recipe 'their'; choose from resnet8, ")
    assert line.endswith(", theirs")
    _workspace(tmp_path, THEIRS.replace("epochs = 4", "epoch = 4"))
    assert main(["--workspace", str(tmp_path), "train", "theirs"]) == 1
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("error: ") and "unknown key recipes.theirs.epoch" in line
