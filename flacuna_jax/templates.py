"""Vicuna v1.1 conversation template with an exact, assistant-only loss mask.

The prompt string is the one FastChat's ``vicuna_v1.1`` template renders
(``SeparatorStyle.ADD_COLON_TWO``, ``sep=" "``, ``sep2="</s>"``)::

    {system} USER: {q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT: {a2}</s>

FastChat renders a message that is empty as ``ROLE:`` with no separator after
it, which is also how a generation prompt ends (``... ASSISTANT:``).

Token ids are built segment by segment instead of tokenizing the whole string
and re-locating the answers with hard-coded offsets (FastChat's ``-2``). The
string is cut only at masked/trained boundaries, and every boundary sits right
before a space (``...ASSISTANT:`` | `` answer``) or at an ``</s>`` (which is the
EOS *id*, never text). SentencePiece splits words at spaces and never merges
across them, so encoding the segments one by one gives the same ids as
encoding the full string; ``tests/test_templates.py`` checks that equality
against ``AutoTokenizer`` on every conversation of the sample.

Leading-space convention: the first text segment gets SentencePiece's dummy
prefix (``▁A chat``); text right after ``</s>`` gets none (``USER`` not
``▁USER``). This is what ``LlamaTokenizer(legacy=False)`` produces for the
literal FastChat string, and the ids decode back to that exact string.
(``legacy=True`` would insert a space after every ``</s>``.)

BOS: the tokenizer's own rule decides. A LLaMA SentencePiece tokenizer adds it
(``add_bos_token``, true unless its tokenizer_config.json says otherwise); any other
tokenizer gets the special tokens it puts before a text itself (SmolLM2's byte-level
BPE: none). ``tokenizer.prefix_ids`` holds them.

Mask: BOS, the system text and user turns are 0; each assistant answer and
its EOS are 1. An empty assistant message is rendered as FastChat does
(``ASSISTANT:`` with no ``</s>``) and trains nothing.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Iterable, Sequence

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
ROLES = ("USER", "ASSISTANT")
SEP, SEP2 = " ", "</s>"
ROLE_ALIASES = {"human": "human", "user": "human", "gpt": "gpt", "assistant": "gpt",
                "system": "system"}


class ConversationError(ValueError):
    """A conversation that the template cannot render (bad role order etc.)."""


@dataclasses.dataclass(frozen=True)
class Turns:
    """A conversation normalised for the template."""
    system: str
    turns: tuple[tuple[str, str], ...]  # ("human"|"gpt", text), alternating from human
    skipped_leading: int  # leading non-human turns dropped, as FastChat does


def normalize(conversations: Sequence[dict[str, Any]], system: str | None = None) -> Turns:
    """Maps roles to human/gpt, applies system turns and FastChat's leading-turn skip."""
    system_text = SYSTEM if system is None else system
    turns: list[tuple[str, str]] = []
    for j, turn in enumerate(conversations):
        role = ROLE_ALIASES.get(turn.get("from"))
        if role is None:
            raise ConversationError(f"turn {j}: unknown role {turn.get('from')!r}")
        value = turn.get("value")
        if not isinstance(value, str):
            raise ConversationError(f"turn {j}: value is {type(value).__name__}, not a string")
        if role == "system":
            if turns:
                raise ConversationError(f"turn {j}: a system turn must come first")
            system_text = value
            continue
        turns.append((role, value))
    skipped = 0
    if turns and turns[0][0] != "human":  # FastChat skips the first turn if not human
        turns, skipped = turns[1:], 1
    for j, (role, _) in enumerate(turns):
        expected = "human" if j % 2 == 0 else "gpt"
        if role != expected:
            raise ConversationError(
                f"turn {j + skipped}: expected {expected} after skipping {skipped} leading "
                f"turn(s), got {role} (roles must alternate human/gpt)")
    return Turns(system_text, tuple(turns), skipped)


def segments(turns: Turns) -> list[tuple[str, bool]]:
    """(text, trained) pieces whose concatenation is FastChat's prompt string.

    ``"</s>"`` appears as its own piece and stands for the EOS id. Adjacent masked
    text is merged, so pieces alternate masked / trained.
    """
    out: list[tuple[str, bool]] = []
    masked = turns.system + SEP
    for i, (role, message) in enumerate(turns.turns):
        name = ROLES[i % 2]
        if not message:
            masked += name + ":"
        elif i % 2 == 0:
            masked += name + ": " + message + SEP
        else:
            out.append((masked + name + ":", False))
            out.append((" " + message, True))
            out.append((SEP2, True))
            masked = ""
    if masked:
        out.append((masked, False))
    return out


def render(conversations: Sequence[dict[str, Any]], system: str | None = None) -> str:
    """The exact FastChat ``get_prompt()`` string of a training conversation."""
    return "".join(text for text, _ in segments(normalize(conversations, system)))


def generation_prompt(history: Iterable[tuple[str, str]], message: str,
                      system: str | None = None) -> str:
    """Prompt for the next answer: history of (user, assistant) pairs + a new user message.

    Ends with ``"ASSISTANT:"`` exactly as FastChat renders an empty assistant message.
    """
    conv = []
    for q, a in history:
        conv += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
    conv += [{"from": "human", "value": message}, {"from": "gpt", "value": ""}]
    return render(conv, system)


def _split_at(ids: list[int], eos_id: int) -> list[list[int]]:
    """The runs of ids between EOS tokens (decoded one by one, then joined with "</s>")."""
    chunks: list[list[int]] = [[]]
    for i in ids:
        if i == eos_id:
            chunks.append([])
        else:
            chunks[-1].append(i)
    return chunks


class SegmentTokenizer:
    """SentencePiece encoder that tokenizes prompt segments without spurious spaces.

    Built from a LLaMA-style SentencePiece model with the dummy prefix switched off;
    the prefix is then added by hand to the first segment only.
    """

    def __init__(self, model_proto: bytes, add_bos: bool = True):
        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(model_proto)
        norm = proto.normalizer_spec
        if norm.remove_extra_whitespaces:
            raise ValueError("SentencePiece model collapses whitespace "
                             "(remove_extra_whitespaces=true); it cannot reproduce the prompt")
        self.add_dummy_prefix = norm.add_dummy_prefix
        norm.add_dummy_prefix = False
        self._proto = proto.SerializeToString()
        self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
        self.bos_id, self.eos_id = self._sp.bos_id(), self._sp.eos_id()
        if self.bos_id < 0 or self.eos_id < 0:
            raise ValueError("SentencePiece model needs bos and eos ids")
        self.vocab_size = self._sp.get_piece_size()
        self.prefix_ids: tuple[int, ...] = (self.bos_id,) if add_bos else ()

    def __getstate__(self):  # picklable for worker processes
        return {k: v for k, v in self.__dict__.items() if k != "_sp"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._sp = spm.SentencePieceProcessor(model_proto=self._proto)

    @classmethod
    def load(cls, tokenizer: Any) -> "SegmentTokenizer | HFSegmentTokenizer":
        """From a tokenizer dir, a ``.model`` file, an ``spm`` processor or a HF tokenizer.

        A LLaMA-style SentencePiece model is used directly (fast, exact); any other HF
        tokenizer goes through :class:`HFSegmentTokenizer`.
        """
        if isinstance(tokenizer, (SegmentTokenizer, HFSegmentTokenizer)):
            return tokenizer
        if isinstance(tokenizer, spm.SentencePieceProcessor):
            return cls(tokenizer.serialized_model_proto())
        is_path = isinstance(tokenizer, (str, os.PathLike))
        path = tokenizer if is_path else (
            getattr(tokenizer, "vocab_file", None) or getattr(tokenizer, "name_or_path", None))
        path = os.fspath(path) if path else ""
        model = os.path.join(path, "tokenizer.model") if os.path.isdir(path) else path
        if model.endswith(".model") and os.path.isfile(model):
            with open(model, "rb") as f:
                proto = f.read()
            if is_path:
                return cls(proto, _config_add_bos(os.path.dirname(model)))
            segments = cls(proto)  # an HF tokenizer object: does it put BOS before a text?
            segments.prefix_ids = (segments.bos_id,) if tokenizer("a")["input_ids"][:1] == [segments.bos_id] else ()
            return segments
        if is_path:
            if not os.path.isdir(path):
                raise FileNotFoundError(f"tokenizer not found: {path}")
            from transformers import AutoTokenizer
            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False, local_files_only=True)
        return HFSegmentTokenizer(tokenizer)

    def encode_texts(self, texts: list[str], first: bool) -> list[list[int]]:
        if first and self.add_dummy_prefix and texts:
            texts = [" " + texts[0]] + texts[1:]
        return self._sp.encode(texts)

    def decode(self, ids: Sequence[int]) -> str:
        """Inverse of the template encoding: EOS ids become ``</s>``.

        A sequence starting with BOS is a whole prompt: BOS and the dummy-prefix space
        are dropped. Any other id list (e.g. one answer span) decodes verbatim.
        """
        ids = [int(i) for i in ids]
        whole = bool(ids) and ids[0] == self.bos_id
        if whole:
            ids = ids[1:]
        chunks = _split_at(ids, self.eos_id)
        text = SEP2.join(self._sp.decode(c) for c in chunks)
        if whole and self.add_dummy_prefix and text.startswith(" "):
            text = text[1:]
        return text


def _config_add_bos(directory: str) -> bool:
    """tokenizer_config.json's add_bos_token beside a tokenizer.model (LLaMA's default, true, without one)."""
    import json

    try:
        with open(os.path.join(directory, "tokenizer_config.json"), encoding="utf-8") as f:
            value = json.load(f).get("add_bos_token", True)
    except (OSError, ValueError):
        return True
    return value is not False


class HFSegmentTokenizer:
    """Fallback for tokenizers without a SentencePiece model (e.g. byte/char-level ones).

    Each segment is encoded with ``add_special_tokens=False``, which is only exact when the
    tokenizer's pieces do not merge across segment boundaries: checked on a probe at load.
    The special tokens the tokenizer itself puts before a text (BOS or none) are found on a
    probe too and become ``prefix_ids``.
    """

    def __init__(self, tokenizer: Any):
        self._tok = tokenizer
        self.bos_id, self.eos_id = tokenizer.bos_token_id, tokenizer.eos_token_id
        if self.eos_id is None:
            raise ValueError(f"{type(tokenizer).__name__} needs an eos token")
        self.vocab_size = len(tokenizer)
        probe = "USER: hi"
        plain, special = tokenizer(probe, add_special_tokens=False)["input_ids"], tokenizer(probe)["input_ids"]
        starts = [i for i in range(len(special) - len(plain) + 1) if special[i:i + len(plain)] == plain]
        if not starts:
            raise ValueError(f"{type(tokenizer).__name__}: special tokens change the text's own ids")
        self.prefix_ids = tuple(int(i) for i in special[:starts[0]])
        head, tail = "USER: hi ASSISTANT:", " yo"
        whole, parts = self.encode_texts([head + tail], True)[0], self.encode_texts([head, tail], True)
        if whole != parts[0] + parts[1]:
            raise ValueError(f"{type(tokenizer).__name__} does not tokenize segments "
                             "consistently; use a SentencePiece (tokenizer.model) tokenizer")

    def encode_texts(self, texts: list[str], first: bool) -> list[list[int]]:
        del first
        return [list(x) for x in self._tok(texts, add_special_tokens=False)["input_ids"]] if texts else []

    def decode(self, ids: Sequence[int]) -> str:
        ids = [int(i) for i in ids]
        if self.prefix_ids and tuple(ids[:len(self.prefix_ids)]) == self.prefix_ids:
            ids = ids[len(self.prefix_ids):]
        chunks = _split_at(ids, self.eos_id)
        backend = getattr(self._tok, "backend_tokenizer", None)
        if backend is not None and backend.decoder is None:  # plain vocab: tokens are text
            return SEP2.join("".join(self._tok.convert_ids_to_tokens(c)) for c in chunks)
        return SEP2.join(self._tok.decode(c, clean_up_tokenization_spaces=False) for c in chunks)


@dataclasses.dataclass(frozen=True)
class Encoded:
    ids: list[int]
    mask: list[int]  # 1 where the token itself is trained (answer token or its EOS)
    skipped_leading: int


def encode(conversations: Sequence[dict[str, Any]], tokenizer: Any,
           system: str | None = None) -> Encoded:
    """Token ids and per-token loss mask of a conversation (BOS first where the tokenizer adds one; never truncated)."""
    tok = SegmentTokenizer.load(tokenizer)
    turns = normalize(conversations, system)
    return _encode_segments(segments(turns), tok, turns.skipped_leading)


def _encode_segments(segs: list[tuple[str, bool]], tok: SegmentTokenizer,
                     skipped: int) -> Encoded:
    texts = [t for t, _ in segs if t != SEP2]
    encoded = iter(tok.encode_texts(texts, first=True))
    ids, mask = list(tok.prefix_ids), [0] * len(tok.prefix_ids)
    for text, trained in segs:
        piece = [tok.eos_id] if text == SEP2 else next(encoded)
        ids += piece
        mask += [int(trained)] * len(piece)
    return Encoded(ids, mask, skipped)


def encode_generation_prompt(history: Iterable[tuple[str, str]], message: str,
                             tokenizer: Any, system: str | None = None) -> list[int]:
    """Ids of :func:`generation_prompt`, tokenized exactly as in training."""
    conv = []
    for q, a in history:
        conv += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
    conv += [{"from": "human", "value": message}, {"from": "gpt", "value": ""}]
    return encode(conv, tokenizer, system).ids
