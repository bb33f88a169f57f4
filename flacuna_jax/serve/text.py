"""Generated ids -> the text OpenAI's API returns, incrementally, cut at stop strings.

Stop strings are matched on the decoded text, as OpenAI (and vLLM) do: the text ends right before
the first occurrence of any stop string, which is not returned, and generation stops there. (The
batch decoder matches stop *token sequences* with an automaton on the device, `lm_eval
.stop_sequences_table`; a string can also appear through other tokens, e.g. "\\n\\n" as one token or
two, so the server, which sees every token on the host anyway, matches text.)

While streaming, text is held back when it could still change: a trailing incomplete character
(the tokenizer decodes a partial UTF-8 sequence to U+FFFD) and a tail that could be the start of a
stop string. A streamed reply's pieces therefore concatenate to exactly the non-streamed text,
which is built from the same pieces.
"""

from __future__ import annotations

from typing import Callable, Sequence


class TextStream:
    """One choice's text: `push(ids)` with every id generated so far returns the new text that is
    safe to show; `stopped` says a stop string was reached; `finish(ids)` returns the rest."""

    def __init__(self, decode: Callable[[Sequence[int]], str], stop: Sequence[str] = ()):
        self.decode, self.stop = decode, tuple(s for s in stop if s)
        self.text, self.stopped = "", False

    def _first_stop(self, full: str) -> int | None:
        hits = [i for i in (full.find(s) for s in self.stop) if i >= 0]
        return min(hits) if hits else None

    def _held_tail(self, full: str) -> int:
        """Length of the longest tail of `full` that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(full)), best, -1):
                if full.endswith(s[:k]):
                    best = k
                    break
        return best

    def _advance(self, target: str) -> str:
        # Decoding more ids could in principle rewrite earlier text; what was shown stays, so the
        # streamed pieces and the final text remain the same string.
        if not target.startswith(self.text):
            return ""
        delta, self.text = target[len(self.text):], target
        return delta

    def push(self, ids: Sequence[int]) -> str:
        full = self.decode(ids)
        cut = self._first_stop(full)
        if cut is not None:
            self.stopped = True
            return self._advance(full[:cut])
        safe = full.rstrip("\ufffd")
        return self._advance(safe[:len(safe) - self._held_tail(safe)])

    def finish(self, ids: Sequence[int]) -> str:
        """No more ids come: everything up to a stop string (if one appears) is released."""
        full = self.decode(ids)
        cut = self._first_stop(full)
        return self._advance(full if cut is None else full[:cut])
