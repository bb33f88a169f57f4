"""Build FLAN-Mini from its sources: the paper's Table 1 as a recipe anyone can rerun and change.

    python -m flacuna_jax.data build --recipe configs/flan_mini.yaml --out DIR [--scale F] [--seed N]

``recipe.py`` (what to build), ``rows.py`` (a source's rows through ``datasets``), ``schema.py``,
``readers.py`` and ``code_readers.py`` (one reader per published schema), ``template_pool.py`` (the
FLAN-style templates of the code tasks), ``sampling.py`` (seeded keys), ``shard.py`` (one source's
sample, rendered), ``mixer.py`` (the interleave and the released layout), ``card.py`` (the data card).
"""

from flacuna_jax.data.flan_mini.mixer import OUTPUT_NAME, build
from flacuna_jax.data.flan_mini.recipe import Entry, Recipe, RecipeError, load_recipe, parse_recipe

__all__ = ["OUTPUT_NAME", "Entry", "Recipe", "RecipeError", "build", "load_recipe", "parse_recipe"]
