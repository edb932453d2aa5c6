"""Recipes: the model families the training core trains. ``recipe:`` in a run config names one.

The registry names modules rather than importing them, so that loading a config does not import a model family's
dependencies.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from biomedgpt.train.recipes.base import DataPlan, Recipe, StepLoss

DEFAULT_RECIPE = "biomedgpt"


@dataclass(frozen=True)
class RecipeEntry:
    """Where a recipe's run config dataclass and its :class:`Recipe` live, as ``module:attribute``."""

    config: str
    recipe: str


RECIPES: dict[str, RecipeEntry] = {
    "biomedgpt": RecipeEntry("biomedgpt.train.config:TrainConfig", "biomedgpt.train.recipes.biomedgpt:BiomedGPTRecipe"),
    "causal_lm": RecipeEntry(
        "biomedgpt.train.recipes.causal_lm_config:CausalLMTrainConfig",
        "biomedgpt.train.recipes.causal_lm:CausalLMRecipe",
    ),
}

__all__ = [
    "DEFAULT_RECIPE",
    "RECIPES",
    "DataPlan",
    "Recipe",
    "RecipeEntry",
    "StepLoss",
    "build_recipe",
    "recipe_class",
    "recipe_config_class",
]


def _load(reference: str) -> Any:
    module, _, attribute = reference.partition(":")
    return getattr(importlib.import_module(module), attribute)


def _entry(name: str) -> RecipeEntry:
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose one of {sorted(RECIPES)}")
    return RECIPES[name]


def recipe_config_class(name: str) -> type:
    """The run config dataclass of recipe ``name`` (light: no model family's dependencies are imported)."""
    return _load(_entry(name).config)


def recipe_class(name: str) -> type[Recipe]:
    return _load(_entry(name).recipe)


def build_recipe(config: Any) -> Recipe:
    """The recipe the run config names (``config.recipe``), built from that config."""
    return recipe_class(config.recipe)(config)
