"""A FLAN-Mini recipe: which sources, read how, how many records each (the paper's Table 1 as data).

A recipe is YAML (``configs/flan_mini.yaml``)::

    seed: 0
    sources:
      - name: flan2021                      # [a-z0-9_]+, unique; the records' "source" and id prefix
        path: hf://DataProvenanceInitiative/flan2021_submix_original   # or a local file / dir / glob
        reader: flan                        # the schema the source is published in (readers.READERS)
        count: 388000
        # optional: split (train), config, data_files, streaming (false), on_bad_row (error|skip),
        # allow_fewer (false: too few rows is an error naming the source; true: take what there is)
        # templated readers only: fewshot (0.5), with_options (0.5), max_shots (3), fewshot_max_chars (5000)

An unknown key, a missing one or a value of the wrong type is a :class:`RecipeError` naming the
entry and the key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import re
from typing import Any

import yaml

from flacuna_jax.data.records import DataError

NAME_RE = re.compile(r"^[a-z0-9_]+$")
ON_BAD_ROW = ("error", "skip")
TEMPLATED_KEYS = ("fewshot", "with_options", "max_shots", "fewshot_max_chars")


class RecipeError(DataError):
    """A recipe key is unknown, missing or invalid; the message names the entry and key."""


@dataclasses.dataclass(frozen=True)
class Entry:
    name: str
    path: str
    reader: str
    count: int
    split: str = "train"
    config: str | None = None
    data_files: Any = None  # str | list[str] | None, passed to datasets.load_dataset
    streaming: bool = False
    on_bad_row: str = "error"
    allow_fewer: bool = False
    fewshot: float = 0.5  # fraction of templated records given few-shot exemplars
    with_options: float = 0.5  # fraction of multiple-choice records that list their options
    max_shots: int = 3
    fewshot_max_chars: int = 5000  # exemplars are dropped (last first) until the prompt fits


@dataclasses.dataclass(frozen=True)
class Recipe:
    entries: tuple[Entry, ...]
    seed: int = 0
    description: str = ""
    text: str = ""  # the YAML as written (goes into the data card)
    file: str = ""

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()

    @property
    def total(self) -> int:
        return sum(e.count for e in self.entries)

    def scaled(self, scale: float) -> "Recipe":
        """Every count times ``scale``, rounded half up; a non-zero count stays at least 1."""
        if not (math.isfinite(scale) and scale > 0):
            raise RecipeError(f"--scale must be a finite number > 0, got {scale}")
        entries = tuple(dataclasses.replace(e, count=max(1, math.floor(e.count * scale + 0.5)) if e.count else 0)
                        for e in self.entries)
        return dataclasses.replace(self, entries=entries)


_TYPES = {f.name: f.type for f in dataclasses.fields(Entry)}
_REQUIRED = ("name", "path", "reader", "count")


def _check(where: str, key: str, value: Any, ok: bool, expected: str) -> Any:
    if not ok:
        raise RecipeError(f"{where}: '{key}' must be {expected}, got {value!r}")
    return value


def parse_entry(raw: Any, where: str) -> Entry:
    from flacuna_jax.data.flan_mini.readers import READERS

    if not isinstance(raw, dict):
        raise RecipeError(f"{where}: a source must be a mapping with {', '.join(_REQUIRED)}, got {raw!r}")
    name = raw.get("name")
    where = f"{where} ({name})" if isinstance(name, str) else where
    unknown = sorted(set(raw) - set(_TYPES))
    if unknown:
        raise RecipeError(f"{where}: unknown key(s) {unknown} (known: {sorted(_TYPES)})")
    missing = [k for k in _REQUIRED if k not in raw]
    if missing:
        raise RecipeError(f"{where}: missing key(s) {missing}")
    v = dict(raw)
    _check(where, "name", name, isinstance(name, str) and bool(NAME_RE.match(name)), "[a-z0-9_]+")
    _check(where, "path", v["path"], isinstance(v["path"], str) and v["path"].strip() != "", "a non-empty string")
    _check(where, "reader", v["reader"], v["reader"] in READERS, f"one of {sorted(READERS)}")
    for key in ("count", "max_shots", "fewshot_max_chars"):
        if key in v:
            low = 1 if key != "count" else 0
            _check(where, key, v[key], type(v[key]) is int and v[key] >= low, f"an integer >= {low}")
    for key in ("fewshot", "with_options"):
        if key in v:
            _check(where, key, v[key], isinstance(v[key], (int, float)) and not isinstance(v[key], bool)
                   and 0 <= v[key] <= 1, "a number in [0, 1]")
            v[key] = float(v[key])
    for key in ("streaming", "allow_fewer"):
        if key in v:
            _check(where, key, v[key], isinstance(v[key], bool), "true or false")
    for key in ("split", "config"):
        if key in v and v[key] is not None:
            _check(where, key, v[key], isinstance(v[key], str) and v[key] != "", "a non-empty string")
    if "on_bad_row" in v:
        _check(where, "on_bad_row", v["on_bad_row"], v["on_bad_row"] in ON_BAD_ROW, f"one of {list(ON_BAD_ROW)}")
    if v.get("data_files") is not None:
        files = v["data_files"]
        ok = isinstance(files, str) or (isinstance(files, list) and all(isinstance(f, str) for f in files))
        _check(where, "data_files", files, ok, "a path or a list of paths")
    if not READERS[v["reader"]].templated:
        extra = [k for k in TEMPLATED_KEYS if k in v]
        if extra:
            raise RecipeError(f"{where}: {extra} only apply to templated readers "
                              f"({sorted(k for k, r in READERS.items() if r.templated)}), not '{v['reader']}'")
    return Entry(**v)


def parse_recipe(raw: Any, text: str = "", file: str = "") -> Recipe:
    where = file or "recipe"
    if not isinstance(raw, dict):
        raise RecipeError(f"{where}: expected a mapping with 'sources', got {type(raw).__name__}")
    unknown = sorted(set(raw) - {"seed", "sources", "description"})
    if unknown:
        raise RecipeError(f"{where}: unknown top-level key(s) {unknown} (known: description, seed, sources)")
    seed = raw.get("seed", 0)
    _check(where, "seed", seed, type(seed) is int and seed >= 0, "an integer >= 0")
    description = raw.get("description", "") or ""
    _check(where, "description", description, isinstance(description, str), "a string")
    sources = raw.get("sources")
    if not isinstance(sources, list) or not sources:
        raise RecipeError(f"{where}: 'sources' must be a non-empty list of entries")
    entries = tuple(parse_entry(s, f"{where}: sources[{i}]") for i, s in enumerate(sources))
    seen: set[str] = set()
    for e in entries:
        if e.name in seen:
            raise RecipeError(f"{where}: source name '{e.name}' is used twice (names must be unique)")
        seen.add(e.name)
    return Recipe(entries, seed, description, text or yaml.safe_dump(raw, sort_keys=False), file)


def load_recipe(path: str) -> Recipe:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise RecipeError(f"{path}: cannot read the recipe: {e.strerror}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: invalid YAML: {e}") from None
    return parse_recipe(raw, text, path)
