"""The recipe table: every recipe builds its model, and a recipe that cannot run is refused
when it is written."""
from __future__ import annotations

import dataclasses

import pytest

from dynviz.recipes import RECIPES


def test_epochs_must_split_into_cycles():
    with pytest.raises(ValueError, match="cycles"):
        dataclasses.replace(RECIPES["resnet8"], epochs=5, cycles=2)


def test_a_recipe_with_a_teacher_needs_a_distill_weight():
    with pytest.raises(ValueError, match="distill weight"):
        dataclasses.replace(RECIPES["resnet8"], teacher="resnet8")


def test_every_recipe_builds_its_model():
    for name, recipe in RECIPES.items():
        model = recipe.build()
        assert sum(p.numel() for p in model.parameters()) > 0, name
        if recipe.trainable:
            assert any(n.startswith(recipe.trainable) for n, _ in model.named_parameters()), name
