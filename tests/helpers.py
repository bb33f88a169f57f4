"""Helpers shared by tests: a character-level tokenizer and the transformers reference model."""

from __future__ import annotations

import json
import string
from pathlib import Path

import numpy as np


def write_char_tokenizer(out: Path) -> Path:
    """A fast tokenizer, one token per printable ASCII character, BOS added: no training needed."""
    from tokenizers import Tokenizer, models, processors

    chars = sorted(set(string.printable) - set("\x0b\x0c"))
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "add_bos_token": True}))
    return out


def hf_reference(model_dir, dtype="float32"):
    import torch
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(str(model_dir), dtype=getattr(torch, dtype)).eval()


def hf_logits(ref, ids: np.ndarray, **kw) -> np.ndarray:
    import torch

    with torch.no_grad():
        return ref(torch.as_tensor(np.asarray(ids), dtype=torch.long), **kw).logits.float().numpy()
