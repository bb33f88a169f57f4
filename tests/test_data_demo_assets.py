"""Demo sample + tokenizer: deterministic bytes, FLAN-Mini shape and mix, HF-loadable round trip."""

import collections
import hashlib
import os

from flacuna_jax import demo_assets
from tests.conftest_data import demo_dir, hf_tokenizer, sample_path, sample_records, tokenizer_dir  # noqa: F401


def _digest(root):
    h = hashlib.sha256()
    for dirpath, _, files in sorted(os.walk(root)):
        for name in sorted(files):
            with open(os.path.join(dirpath, name), "rb") as f:
                h.update(name.encode() + f.read())
    return h.hexdigest()


def test_same_bytes_every_run(demo_dir, tmp_path):
    demo_assets.main(["--out", str(tmp_path)])
    assert _digest(tmp_path) == _digest(demo_dir)


def test_sample_shape_and_mix(sample_records):
    assert len(sample_records) == demo_assets.NUM_RECORDS
    assert len({r["id"] for r in sample_records}) == len(sample_records)
    for r in sample_records:
        assert set(r) == {"id", "source", "conversations"}
        roles = [t["from"] for t in r["conversations"]]
        assert roles == ["human", "gpt"] * (len(roles) // 2) and roles
        assert all(isinstance(t["value"], str) and t["value"] for t in r["conversations"])
    sources = collections.Counter(r["source"] for r in sample_records)
    for s in ("flan2021", "flan2021_fewshot", "t0", "niv2", "cot", "code_alpaca", "sharegpt"):
        assert sources[s] >= 50, sources
    assert any(len(r["conversations"]) >= 6 for r in sample_records)  # multi-turn chat


def test_tokenizer_is_llama_style(hf_tokenizer, tokenizer_dir):
    import sentencepiece as spm
    tok = hf_tokenizer
    assert type(tok).__name__ == "LlamaTokenizer"
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert len(tok) == demo_assets.VOCAB_SIZE
    text = "Héllo wörld 😀 12345\n  two  spaces"
    ids = tok(text).input_ids
    assert ids[0] == 1 and tok.decode(ids, skip_special_tokens=True) == text
    assert "<0xF0>" in tok.convert_ids_to_tokens(ids)  # byte fallback for the emoji
    sp = spm.SentencePieceProcessor(model_file=os.path.join(tokenizer_dir, "tokenizer.model"))
    assert sp.encode(text) == ids[1:]
