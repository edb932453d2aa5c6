"""Recipes: the model families the training core trains. ``recipe:`` in a run config names one.

The registry names modules rather than importing them, so that loading a config does not import a model family's
dependencies.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from biomedgpt.train.recipes.base import DataPlan, Recipe, StepLoss

DEFAULT_RECIPE = "biomedgpt"


@dataclass(frozen=True)
class RecipeEntry:
    """Where a recipe's run config dataclass, its :class:`Recipe` and its start check live, as ``module:attribute``.

    The start check, ``(config, *, allow_missing=False, hint="") -> list[str]``, runs before any process group (and in
    SLURM's batch shell, so its module is light): a ValueError naming every unusable input, ``hint`` ending the
    message; with ``allow_missing`` (planning) the problems are reported instead. It returns warnings to show.
    """

    config: str
    recipe: str
    start_checks: str


RECIPES: dict[str, RecipeEntry] = {
    "biomedgpt": RecipeEntry(
        "biomedgpt.train.config:TrainConfig",
        "biomedgpt.train.recipes.biomedgpt:BiomedGPTRecipe",
        "biomedgpt.train.preflight:start_checks",
    ),
    "causal_lm": RecipeEntry(
        "biomedgpt.train.recipes.causal_lm_config:CausalLMTrainConfig",
        "biomedgpt.train.recipes.causal_lm:CausalLMRecipe",
        "biomedgpt.train.recipes.causal_lm_preflight:start_checks",
    ),
    "vision_chat": RecipeEntry(
        "biomedgpt.train.recipes.vision_chat_config:VisionChatTrainConfig",
        "biomedgpt.train.recipes.vision_chat:VisionChatRecipe",
        "biomedgpt.train.recipes.vision_chat_preflight:start_checks",
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
    "recipe_start_checks",
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


def recipe_start_checks(name: str) -> Callable[..., list[str]]:
    """The start check of recipe ``name`` (light: see :class:`RecipeEntry`)."""
    return _load(_entry(name).start_checks)


def build_recipe(config: Any) -> Recipe:
    """The recipe the run config names (``config.recipe``), built from that config."""
    return recipe_class(config.recipe)(config)
