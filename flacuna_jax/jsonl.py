"""JSON Lines inputs of the command-line tools: prompts, scoring requests, evaluation questions.

One JSON object per line (a `.gz` file is decompressed); blank lines are skipped. Every error names
FILE:LINE and is raised as the caller's error class, so each tool reports it as its own one-line
input error.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from pathlib import Path


def read_objects(path: str | Path, error: type[Exception] = ValueError) -> Iterator[tuple[str, dict]]:
    """Yields ("FILE:LINE", object) for each non-blank line of `path`."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: file not found")
    try:
        raw = gzip.decompress(path.read_bytes()) if path.name.endswith(".gz") else path.read_bytes()
        text = raw.decode("utf-8")
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise error(f"{path}: cannot read ({e})") from None
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            rec = json.loads(line)
        except ValueError as e:
            raise error(f"{where}: invalid JSON ({e})") from None
        if not isinstance(rec, dict):
            raise error(f"{where}: expected a JSON object, got {type(rec).__name__}")
        yield where, rec
