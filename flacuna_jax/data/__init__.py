"""FLAN-Mini on Grain: sources, Vicuna v1.1 template + exact loss mask, packing, sharding.

Main entry points: :func:`make_pipeline` / :func:`pipeline_from_config` (see
``pipeline.py`` for the batch contract) and ``python -m flacuna_jax.data preview|stats``.
"""

from flacuna_jax.data.packing import build_row
from flacuna_jax.data.pipeline import (Pipeline, counts_from_state, make_pipeline,
                                       pipeline_from_config, split_indices)
from flacuna_jax.data.records import DataError
from flacuna_jax.data.sources import SourceSpec, open_source, parse_sources

__all__ = ["DataError", "Pipeline", "SourceSpec", "build_row", "counts_from_state",
           "make_pipeline", "open_source", "parse_sources", "pipeline_from_config",
           "split_indices"]
