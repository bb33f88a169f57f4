"""scripts/demo_same_tokens.py, the check closing `make demo`: transformers on a merged export and our
`generate` CLI on base + PEFT adapter, compared token by token; a difference fails it (exit 1).
A decisive tiny model and a random adapter stand in for the demo's trained ones. ~10 s."""

import dataclasses
import importlib.util
import json
import shutil

import pytest

from benchmarks.common import ROOT
from flacuna_jax import tiny
from tests.helpers import CHAR_VOCAB, write_decisive_model

PROMPT = "Write add(a, b)."


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("demo_same_tokens", ROOT / "scripts" / "demo_same_tokens.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_demo_check_passes_on_the_same_tokens_and_fails_on_others(script, char_tokenizer_dir, tmp_path, capsys):
    from benchmarks.parity import random_factors
    from flacuna_jax import convert, generate, hf, peft_io
    from flacuna_jax.model import LoraSpec

    base = write_decisive_model(tmp_path / "base", dataclasses.replace(tiny.PRESETS["gqa"], vocab_size=CHAR_VOCAB), seed=4)
    for f in char_tokenizer_dir.iterdir():
        shutil.copy(f, base / f.name)
    config = hf.load_hf_config(base)
    spec = LoraSpec(rank=4, alpha=8.0, targets=("q_proj", "v_proj"))
    adapter = peft_io.save_adapter(tmp_path / "adapter", random_factors(config, spec, seed=1), spec, config.num_layers)
    convert.main(["merge", "--model", str(base), "--adapter", str(adapter), "--out", str(tmp_path / "merged")])
    for f in char_tokenizer_dir.iterdir():
        if not (tmp_path / "merged" / f.name).exists():
            shutil.copy(f, tmp_path / "merged" / f.name)

    theirs, prompt, ours = tmp_path / "transformers.json", tmp_path / "prompt.jsonl", tmp_path / "ours.jsonl"
    assert script.main(["hf", "--merged", str(tmp_path / "merged"), "--prompt", PROMPT, "--max-new-tokens", "12",
                        "--out", str(theirs)]) == 0
    assert script.main(["prompt", "--prompt", PROMPT, "--out", str(prompt)]) == 0
    generate.main(["--model", str(base), "--adapter", str(adapter), "--data", str(prompt), "--out", str(ours),
                   "--max-new-tokens", "12"])
    capsys.readouterr()
    assert script.main(["check", str(theirs), str(ours)]) == 0
    n = len(json.loads(theirs.read_text())["tokens"])
    assert f"the same {n} tokens" in capsys.readouterr().out and n >= 2

    row = json.loads(ours.read_text())
    row["tokens"][1] = (row["tokens"][1] + 1) % CHAR_VOCAB
    ours.write_text(json.dumps(row) + "\n")
    assert script.main(["check", str(theirs), str(ours)]) == 1
    assert "the tokens differ at new token 1" in capsys.readouterr().err
    row["tokens"] = row["tokens"][:1]
    ours.write_text(json.dumps(row) + "\n")
    assert script.main(["check", str(theirs), str(ours)]) == 1  # a shorter completion is a difference too


def test_first_difference(script):
    assert script.first_difference([1, 2, 3], [1, 2, 3]) is None
    assert script.first_difference([1, 2, 3], [1, 5, 3]) == 1
    assert script.first_difference([1, 2], [1, 2, 2]) == 2
