"""Readers of the sources that are instructions already: the FLAN collection, Alpaca-style, ShareGPT.

- ``flan``: the FLAN collection's exported submixes (google-research/FLAN ``flan/v2``, on the hub
  as ``*_submix_original``): ``inputs``, ``targets``, ``task_name``, ``template_type``
  (``zs_opt | zs_noopt | fs_opt | fs_noopt``) and ``task_source`` (optional here). FLAN has
  already templated them: ``inputs`` becomes the human turn and ``targets`` the answer, both
  stripped of surrounding whitespace (the chat template adds its own separators).
- ``alpaca``: ``instruction``, ``input`` (may be empty or absent), ``output`` (GPT4-Alpaca's
  ``alpaca_gpt4_data.json``, Code-Alpaca's ``code_alpaca_20k.json``); the human turn is the
  instruction, followed by a blank line and the input when there is one.
- ``sharegpt``: ``{"id", "conversations": [{"from", "value"}]}`` as FastChat's ShareGPT files;
  ``human``/``user`` and ``gpt``/``chatgpt``/``bard``/``bing``/``assistant`` are mapped to
  FLAN-Mini's roles, a ``system`` turn is kept. The conversation must render in the Vicuna
  template (roles alternating after FastChat's leading-turn skip), have an answer, and no turn
  may be empty.
"""

from __future__ import annotations

from flacuna_jax import templates
from flacuna_jax.data.flan_mini.code_readers import AppsReader, CodeContestsReader, CodeSearchNetReader
from flacuna_jax.data.flan_mini.schema import Reader, field
from flacuna_jax.data.records import DataError


class FlanReader(Reader):
    name = "flan"
    columns = ("inputs", "targets", "task_name", "template_type", "task_source")

    def unit(self, row: dict, sub: int, where: str) -> dict:
        inputs = field(row, "inputs", where, nonempty=True).strip()
        targets = field(row, "targets", where, nonempty=True).strip()
        task = field(row, "task_name", where, nonempty=True)
        kind = field(row, "template_type", where, nonempty=True)
        field(row, "task_source", where, optional=True)
        return {"conversations": [{"from": "human", "value": inputs}, {"from": "gpt", "value": targets}],
                "task": task, "template_type": kind}


class AlpacaReader(Reader):
    name = "alpaca"
    columns = ("instruction", "input", "output")

    def unit(self, row: dict, sub: int, where: str) -> dict:
        instruction = field(row, "instruction", where, nonempty=True).strip()
        extra = (field(row, "input", where, optional=True) or "").strip()
        output = field(row, "output", where, nonempty=True).strip()
        human = f"{instruction}\n\n{extra}" if extra else instruction
        return {"conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": output}],
                "task": "with_input" if extra else "instruction", "template_type": None}


SHAREGPT_ROLES = {"human": "human", "user": "human", "gpt": "gpt", "chatgpt": "gpt", "bard": "gpt",
                  "bing": "gpt", "assistant": "gpt", "system": "system"}


class ShareGPTReader(Reader):
    name = "sharegpt"
    columns = ("conversations",)

    def unit(self, row: dict, sub: int, where: str) -> dict:
        conv = field(row, "conversations", where, list)
        turns = []
        for j, turn in enumerate(conv):
            if not isinstance(turn, dict):
                raise DataError(f"{where}: turn {j} is {type(turn).__name__}, expected an object")
            role = field(turn, "from", f"{where}: turn {j}")
            if role not in SHAREGPT_ROLES:
                raise DataError(f"{where}: turn {j}: unknown role {role!r} (expected one of {sorted(SHAREGPT_ROLES)})")
            value = field(turn, "value", f"{where}: turn {j}", nonempty=True)
            turns.append({"from": SHAREGPT_ROLES[role], "value": value})
        try:
            normalized = templates.normalize(turns)
        except templates.ConversationError as e:
            raise DataError(f"{where}: {e}") from None
        if not any(role == "gpt" for role, _ in normalized.turns):
            raise DataError(f"{where}: the conversation has no answer (no gpt turn after the first human one)")
        return {"conversations": turns, "task": "multi_turn" if len(normalized.turns) > 2 else "single_turn",
                "template_type": None}


READERS: dict[str, Reader] = {r.name: r for r in (
    FlanReader(), AlpacaReader(), ShareGPTReader(), CodeSearchNetReader(), CodeContestsReader(), AppsReader())}
