"""FLAN-Mini on Grain: sources, Vicuna v1.1 template + exact loss mask, packing, global batches.

Main entry points: :func:`make_pipeline` / :func:`pipeline_from_config` (see ``pipeline.py``
for the batch contract, ``batches.py`` for how hosts share one packing plan),
``python -m flacuna_jax.data preview|stats`` and ``python -m flacuna_jax.data build`` (FLAN-Mini
from its sources, ``flan_mini/``).

The names below are imported on first use: the builder's worker processes need neither Grain nor
the pipeline, and importing Grain costs seconds.
"""

import importlib

_EXPORTS = {
    "FirstFit": "packing", "build_row": "packing", "count_rows": "packing",
    "EmptySplit": "pipeline", "Pipeline": "pipeline", "counts_from_state": "pipeline",
    "make_pipeline": "pipeline", "pipeline_from_config": "pipeline", "split_indices": "pipeline",
    "DataError": "records",
    "SourceSpec": "sources", "open_source": "sources", "parse_sources": "sources",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"flacuna_jax.data.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'flacuna_jax.data' has no attribute {name!r}")
