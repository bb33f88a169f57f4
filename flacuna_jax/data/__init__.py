"""FLAN-Mini on Grain: sources, Vicuna v1.1 template + exact loss mask, packing, global batches.

Main entry points: :func:`make_pipeline` / :func:`pipeline_from_config` (see ``pipeline.py``
for the batch contract, ``batches.py`` for how hosts share one packing plan) and
``python -m flacuna_jax.data preview|stats``.
"""

from flacuna_jax.data.packing import FirstFit, build_row, count_rows
from flacuna_jax.data.pipeline import (EmptySplit, Pipeline, counts_from_state, make_pipeline,
                                       pipeline_from_config, split_indices)
from flacuna_jax.data.records import DataError
from flacuna_jax.data.sources import SourceSpec, open_source, parse_sources

__all__ = ["DataError", "EmptySplit", "FirstFit", "Pipeline", "SourceSpec", "build_row", "count_rows",
           "counts_from_state", "make_pipeline", "open_source", "parse_sources", "pipeline_from_config",
           "split_indices"]
