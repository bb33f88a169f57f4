"""FLAN-Mini record validation: one clear error per bad record, naming file and record.

A record is ``{"id", "source"?, "conversations": [{"from", "value"}, ...]}`` with roles
``human``/``gpt``/``system`` (``user``/``assistant`` accepted as aliases). Validation also
runs the template's role checks, so a record that passes here always renders.
"""

from __future__ import annotations

from typing import Any

from flacuna_jax import templates

ON_BAD_RECORD = ("error", "skip")


class DataError(ValueError):
    """Bad input data; the message names the file and the record (or line/offset)."""


def validate_record(obj: Any, where: str, default_id: str) -> dict:
    """Returns the normalised record or raises :class:`DataError` mentioning ``where``."""
    if not isinstance(obj, dict):
        raise DataError(f"{where}: record is a {type(obj).__name__}, expected a JSON object")
    conv = obj.get("conversations")
    rid = obj.get("id", default_id)
    where = f"{where} (id={rid!r})" if "id" in obj else where
    if conv is None:
        raise DataError(f"{where}: record has no 'conversations'")
    if hasattr(conv, "tolist"):  # numpy arrays from parquet / datasets
        conv = conv.tolist()
    if not isinstance(conv, (list, tuple)):
        raise DataError(f"{where}: 'conversations' is a {type(conv).__name__}, expected a list")
    turns = []
    for j, turn in enumerate(conv):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise DataError(f"{where}: turn {j} must be an object with 'from' and 'value'")
        role = turn["from"]
        if templates.ROLE_ALIASES.get(role) is None:
            raise DataError(f"{where}: turn {j}: unknown role {role!r} "
                            f"(expected one of {sorted(templates.ROLE_ALIASES)})")
        value = turn["value"]
        if not isinstance(value, str):
            raise DataError(f"{where}: turn {j}: 'value' is {type(value).__name__}, "
                            "expected a string")
        turns.append({"from": templates.ROLE_ALIASES[role], "value": value})
    try:
        templates.normalize(turns)
    except templates.ConversationError as e:
        raise DataError(f"{where}: {e}") from None
    out = {"id": str(rid), "conversations": turns}
    if obj.get("source") is not None:
        out["source"] = str(obj["source"])
    return out


class BadRecordLog:
    """Collects bad records under ``on_bad_record``: raise at once, or count and keep going."""

    def __init__(self, policy: str):
        if policy not in ON_BAD_RECORD:
            raise ValueError(f"on_bad_record must be one of {ON_BAD_RECORD}, got {policy!r}")
        self.policy = policy
        self.count = 0
        self.examples: list[str] = []

    def bad(self, error: DataError) -> None:
        if self.policy == "error":
            raise DataError(f"{error} (set data.on_bad_record=skip to skip bad records)")
        self.count += 1
        if len(self.examples) < 5:
            self.examples.append(str(error))
