"""Looking recipes up by name: every recipe module is imported here, so each has registered itself."""
from __future__ import annotations

from irkit.errors import ConfigError
from irkit.train import recipes, recipes_rerank  # noqa: F401  (importing registers their recipes)
from irkit.train.recipe_base import RECIPES, Recipe


def get_recipe(name: str) -> type[Recipe]:
    if name not in RECIPES:
        raise ConfigError(f"unknown training recipe {name!r}; available: {', '.join(recipe_names())}")
    return RECIPES[name]


def recipe_names() -> list[str]:
    return sorted(RECIPES)


__all__ = ["get_recipe", "recipe_names", "RECIPES"]
