"""Request text -> prompt ids, and generated ids -> reply text, for each prompt format the server speaks.

- Completions: the prompt text tokenized as the tokenizer does by itself (its BOS where it adds
  one), as `generate --raw`; or the token ids given. Replies decode with special tokens skipped.
- Chat, "vicuna" (the default): the messages rendered in Vicuna v1.1 exactly as training renders
  them (`templates.encode_generation_prompt`, segment by segment), a system message replacing the
  default system prompt; the reply decodes as `generate` shows it (`generate.Codec`).
- Chat, "tokenizer": the tokenizer's own chat template (`apply_chat_template`, with the generation
  prompt), for a base model that was not trained on Vicuna's format.

`shared_prefixes` gives the ids every chat prompt of the default system prompt starts with: the
engine prefills them once per adapter.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from flacuna_jax.generate import Codec, common_prefix_len

TEMPLATES = ("vicuna", "tokenizer")


class PromptError(ValueError):
    """A request whose prompt cannot be built; `param` names the field."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


class Prompts:
    def __init__(self, tokenizer: Any, eos_ids: Sequence[int] = (), default_template: str = "vicuna"):
        if default_template not in TEMPLATES:
            raise ValueError(f"chat template {default_template!r}: one of {', '.join(TEMPLATES)}")
        self.tokenizer, self.default_template = tokenizer, default_template
        self.codec = Codec(tokenizer, eos_ids)
        self.has_chat_template = bool(getattr(tokenizer, "chat_template", None))

    # ------------------------------------------------------------------ completions

    def completion_ids(self, prompt: str | Sequence[int], vocab_size: int, param: str = "prompt") -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise PromptError("the prompt is empty", param)
            return list(self.tokenizer(prompt)["input_ids"])
        ids = [int(i) for i in prompt]
        if not ids:
            raise PromptError("the prompt is empty", param)
        bad = [i for i in ids if not 0 <= i < vocab_size]
        if bad:
            raise PromptError(f"token id {bad[0]} is outside the vocabulary [0, {vocab_size})", param)
        return ids

    def decode_plain(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    # ------------------------------------------------------------------ chat

    def chat(self, messages: Sequence[Any], template: str | None = None) -> tuple[list[int], Callable[[Sequence[int]], str]]:
        """(prompt ids, decode) for OpenAI chat messages (objects with .role and .text())."""
        template = template or self.default_template
        turns = [(m.role if m.role != "developer" else "system", m.text()) for m in messages]
        for i, (role, _) in enumerate(turns):
            if role == "system" and i > 0:
                raise PromptError("a system message must come first", f"messages[{i}].role")
        if turns[-1][0] != "user":
            raise PromptError("the last message must be the user's", f"messages[{len(turns) - 1}].role")
        if template == "tokenizer":
            return self._tokenizer_template(turns), self.decode_plain
        system = turns[0][1] if turns[0][0] == "system" else None
        rest = turns[1:] if system is not None else turns
        for j, (role, _) in enumerate(rest):
            expected = "user" if j % 2 == 0 else "assistant"
            if role != expected:
                raise PromptError(f"expected a {expected} message (the Vicuna template alternates user and assistant)",
                                  f"messages[{j + (system is not None)}].role")
        from flacuna_jax.templates import ConversationError, encode_generation_prompt

        history = [(rest[j][1], rest[j + 1][1]) for j in range(0, len(rest) - 1, 2)]
        try:
            ids = encode_generation_prompt(history, rest[-1][1], self.codec.segments, system)
        except ConversationError as e:
            raise PromptError(str(e), "messages") from None
        return ids, self.codec.text

    def _tokenizer_template(self, turns: list[tuple[str, str]]) -> list[int]:
        if not self.has_chat_template:
            raise PromptError("this model's tokenizer has no chat template; use template \"vicuna\"", "template")
        out = self.tokenizer.apply_chat_template([{"role": r, "content": c} for r, c in turns],
                                                 add_generation_prompt=True, tokenize=True)
        ids = out["input_ids"] if hasattr(out, "keys") else out
        return [int(i) for i in ids]

    def shared_prefixes(self) -> list[list[int]]:
        """The ids every default-system chat prompt starts with, per available template."""
        out = []
        for template in TEMPLATES:
            if template == "tokenizer" and not self.has_chat_template:
                continue
            a = self.chat([_Msg("user", "a")], template)[0]
            b = self.chat([_Msg("user", "b")], template)[0]
            n = common_prefix_len([a, b])
            if n:
                out.append(a[:n])
        return out


class _Msg:
    def __init__(self, role: str, content: str):
        self.role, self.content = role, content

    def text(self) -> str:
        return self.content
