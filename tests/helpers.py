"""Helpers shared by tests: a character-level tokenizer, the transformers reference model, and the mark
of tests that need a C++ compiler."""

from __future__ import annotations

import json
import os
import shutil
import string
from pathlib import Path

import numpy as np
import pytest

# Without a C++ compiler the native CPU kernels (`native.py`) cannot be built (the model then runs XLA's,
# which their fallback tests check); CI installs one and sets FLACUNA_REQUIRE_CXX, so there its absence fails.
needs_compiler = pytest.mark.skipif(
    shutil.which(os.environ.get("CXX") or "c++") is None and not os.environ.get("FLACUNA_REQUIRE_CXX"),
    reason="no C++ compiler (set CXX) to build the native CPU kernels")


def write_char_tokenizer(out: Path, add_bos: bool = True, fuse: bool = False) -> Path:
    """A fast tokenizer, one token per printable ASCII character, BOS added unless add_bos=False (as
    SmolLM2's byte-level BPE adds none): no training needed. Without a decoder, `decode` puts a
    space between tokens; `fuse=True` decodes them joined, the text as written ("\n\n" stays a blank line)."""
    from tokenizers import Tokenizer, decoders, models, processors

    chars = sorted(set(string.printable) - set("\x0b\x0c"))
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    if fuse:
        tok.decoder = decoders.Fuse()
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "add_bos_token": add_bos}))
    return out


def hf_reference(model_dir, dtype="float32"):
    import torch
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(str(model_dir), dtype=getattr(torch, dtype)).eval()


def write_peft_adapter(base_dir, out: Path, rank: int, alpha: float, targets, *, seed: int, b_scale: float) -> Path:
    """A LoRA adapter saved by PEFT's own save_pretrained on `base_dir`, its B factors drawn at `b_scale`
    (PEFT starts B at zero, i.e. the base exactly; a test needs the adapter to change the output)."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(hf_reference(base_dir), LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0,
                                                              target_modules=list(targets)))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(b_scale * torch.randn_like(p))
    model.save_pretrained(str(out))
    return Path(out)


def hf_logits(ref, ids: np.ndarray, **kw) -> np.ndarray:
    import torch

    with torch.no_grad():
        return ref(torch.as_tensor(np.asarray(ids), dtype=torch.long), **kw).logits.float().numpy()


CHAR_VOCAB = 101  # tests/helpers.write_char_tokenizer: 3 specials + 98 printable characters


def greedy_requests(ref, tokenizer, contexts, n_new: int = 3) -> list[tuple[str, str]]:
    """(context, continuation) pairs for a char-tokenizer model: per context, the continuation that
    IS the greedy decoding of `ref` (transformers, one token per character; cut before any special
    token), then the same with its last character changed (not greedy, the log-likelihood lower)."""
    import torch

    out = []
    for context in contexts:
        ids = tokenizer(context)["input_ids"]
        with torch.no_grad():
            logits = None
            new = []
            for _ in range(n_new):
                logits = ref(torch.tensor([ids + new])).logits[0, -1]
                new.append(int(logits.argmax()))
        chars = tokenizer.convert_ids_to_tokens([t for t in new[:next((i for i, t in enumerate(new) if t < 3), n_new)]])
        if not chars:
            continue
        greedy = "".join(chars)
        other = next(c for c in "zq" if c != greedy[-1])
        out += [(context, greedy), (context, greedy[:-1] + other)]
    return out
SCALES = {"embed_tokens": 50.0, "lm_head": 25.0}  # std 1.0 and 0.5; every other matrix std 0.1


def write_decisive_model(path, config, seed):
    """A random HF model with large weights: the top logit wins by a wide margin, so greedy tokens
    and argmax-based answers compare exactly between implementations (0.02-init logits are ~uniform)."""
    from flacuna_jax import hf, tiny

    def tensors():
        for name, t in tiny.random_hf_tensors(config, seed):
            if name.endswith("norm.weight"):
                yield name, t
            else:
                yield name, t * SCALES.get(name.split(".")[-2] if "lm_head" in name else name.split(".")[1], 5.0)
    hf.write_hf_weights(path, tensors())
    (path / "config.json").write_text(json.dumps(hf.hf_config_dict(config)))
    (path / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    return path


def write_train_assets(d: Path) -> dict:
    """A small FLAN-Mini-style sample, its SentencePiece tokenizer, a tiny model that fits it (tokenizer
    files beside the weights) and a path for a shared compilation cache, all under `d`."""
    import dataclasses
    import shutil

    from flacuna_jax.demo_assets import write_demo_assets
    from flacuna_jax.tiny import PRESETS, write_tiny_model
    from flacuna_jax.tokenizer import load_tokenizer

    paths = write_demo_assets(d, 400)
    vocab = len(load_tokenizer(paths["tokenizer"]))
    model = write_tiny_model(d / "model", dataclasses.replace(PRESETS["mha"], vocab_size=vocab), seed=2)
    for f in Path(paths["tokenizer"]).iterdir():
        shutil.copy(f, model / f.name)
    return {"model": str(model), "sample": paths["sample"], "jax_cache": str(d / "jax_cache")}


def slow_steps_path() -> str:
    """PYTHONPATH for a training subprocess whose steps SLOW_STEP_S paces (tests/slow_steps)."""
    import os

    root = Path(__file__).resolve().parents[1]
    return os.pathsep.join([str(root / "tests" / "slow_steps"), str(root), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)


class RunsCodeWhenUnpickled:
    """A pickle payload: unpickling it calls exec, which writes `marker` (a loader that runs it fails the test)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pickle code ran')",))


def write_code_running_bin(path: Path, tensors: dict, marker: Path) -> Path:
    """torch.save of real tensors plus one entry whose unpickling runs code (writes `marker`)."""
    import torch

    torch.save({**tensors, "payload": RunsCodeWhenUnpickled(marker)}, path)
    return path


def write_remote_code(model_dir: Path, marker: Path, module: str = "custom_code") -> None:
    """A `module.py` in the dir that writes `marker` when imported: what `auto_map` entries would run."""
    (model_dir / f"{module}.py").write_text(
        f"open({str(marker)!r}, 'w').write('remote code ran')\n"
        "from transformers import PreTrainedTokenizerFast, LlamaConfig, LlamaForCausalLM\n"
        "class CustomTokenizer(PreTrainedTokenizerFast):\n    pass\n"
        "class CustomConfig(LlamaConfig):\n    model_type = 'custom'\n"
        "class CustomModel(LlamaForCausalLM):\n    config_class = CustomConfig\n")
