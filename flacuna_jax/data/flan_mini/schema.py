"""The reader contract and the field checks every reader shares.

A reader turns one published row into units (usually one; one per solution for the code contest
datasets) and one unit into a payload (a JSON-serialisable dict):

- instruction readers (``templated = False``): ``{"conversations", "task", "template_type"}``,
  already a FLAN-Mini conversation;
- templated readers: the fields the template pool renders (``template_pool.POOLS[name]``).

A row that is not in the published schema (a missing field, a wrong type, an empty text) raises
:class:`~flacuna_jax.data.records.DataError` naming the source and the row; the recipe decides
whether that stops the build or is counted and skipped.
"""

from __future__ import annotations

from typing import Any

from flacuna_jax.data.records import DataError

_TYPE_NAMES = {str: "a string", int: "an integer", list: "a list", dict: "an object", bool: "a boolean"}


def field(row: dict, key: str, where: str, kind: type = str, *, optional: bool = False,
          nonempty: bool = False) -> Any:
    """``row[key]`` checked against the published type; None for an absent optional field."""
    value = row.get(key)
    if value is None:
        if optional:
            return None
        raise DataError(f"{where}: missing field '{key}'")
    if hasattr(value, "tolist") and kind is list:  # numpy arrays from some formats
        value = value.tolist()
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise DataError(f"{where}: field '{key}' is {type(value).__name__}, expected {_TYPE_NAMES.get(kind, kind)}")
    if nonempty and isinstance(value, str) and not value.strip():
        raise DataError(f"{where}: field '{key}' is empty")
    return value


def string_list(value: Any, key: str, where: str) -> list[str]:
    if hasattr(value, "tolist"):
        value = value.tolist()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise DataError(f"{where}: field '{key}' must be a list of strings")
    return value


class Reader:
    """Base reader: one unit per row."""

    name = ""
    templated = False
    expands = False  # units() reads the row (one unit per solution, say)
    columns: tuple[str, ...] = ()  # the published columns the reader uses (the others are never decoded)
    count_columns: tuple[str, ...] = ()  # the columns units() needs

    def units(self, row: dict, where: str) -> list[int]:
        """The sub-indices of the row's units (checked as far as counting them needs)."""
        return [0]

    def unit(self, row: dict, sub: int, where: str) -> dict:
        raise NotImplementedError
