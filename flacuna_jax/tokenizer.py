"""Tokenizer loading: a local Hugging Face tokenizer directory, never remote code."""

from __future__ import annotations

from pathlib import Path


class TokenizerError(ValueError):
    pass


def load_tokenizer(path: str | Path):
    """AutoTokenizer from a local dir (tokenizer.json, or tokenizer.model + tokenizer_config.json).

    transformers 5's `LlamaTokenizer(vocab_file=...)` builds an empty vocabulary, so always go
    through `AutoTokenizer.from_pretrained(dir)`.
    """
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise TokenizerError(f"tokenizer directory not found: {path}")
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer.model")):
        raise TokenizerError(f"{path}: no tokenizer.json or tokenizer.model")
    try:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False, local_files_only=True)
    except ValueError as e:
        if "trust_remote_code" not in str(e):
            raise
        raise TokenizerError(f"{path}: the tokenizer needs its own code (auto_map in tokenizer_config.json names "
                             f"a class transformers does not have); flacuna_jax never runs a checkpoint's code: "
                             f"use a standard tokenizer (tokenizer.json / tokenizer.model)") from None
