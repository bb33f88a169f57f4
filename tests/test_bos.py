"""BOS by the tokenizer's own rule, everywhere text becomes ids: the training template (and so training's
encoded ids and mask), generation prompts, raw prompts and scoring. A tokenizer that adds none (like
SmolLM2's byte-level BPE) gets none; LLaMA's SentencePiece gets its BOS unless its config says otherwise."""

import json
import shutil

import pytest

from flacuna_jax import templates as T
from flacuna_jax.tokenizer import load_tokenizer
from tests.conftest_data import demo_dir, tokenizer_dir  # noqa: F401
from tests.helpers import write_char_tokenizer

CONV = [{"from": "human", "value": "Hi there"}, {"from": "gpt", "value": "Hello!"},
        {"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}]


@pytest.fixture(scope="module", params=[True, False], ids=["bos", "no_bos"])
def char_tok(request, tmp_path_factory):
    return request.param, load_tokenizer(write_char_tokenizer(tmp_path_factory.mktemp("chars"), request.param))


@pytest.fixture(scope="module", params=[True, False], ids=["bos", "no_bos"])
def sp_dir(request, tokenizer_dir, tmp_path_factory):  # noqa: F811
    """The demo SentencePiece tokenizer, as is (add_bos_token true) or with add_bos_token false."""
    if request.param:
        return True, tokenizer_dir
    out = tmp_path_factory.mktemp("sp_no_bos") / "tok"
    shutil.copytree(tokenizer_dir, out)
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    (out / "tokenizer_config.json").write_text(json.dumps({**cfg, "add_bos_token": False}))
    return False, str(out)


def _expected_ids(tokenizer, text):
    """What the tokenizer itself makes of the rendered conversation ("</s>" is its EOS token)."""
    return tokenizer(text.replace("</s>", tokenizer.eos_token))["input_ids"]


def test_template_ids_follow_the_char_tokenizers_rule(char_tok):
    adds_bos, tok = char_tok
    seg = T.SegmentTokenizer.load(tok)
    enc = T.encode(CONV, seg)
    assert seg.prefix_ids == ((1,) if adds_bos else ())
    assert (enc.ids[0] == 1) is adds_bos and 1 not in enc.ids[1:]
    assert enc.ids == _expected_ids(tok, T.render(CONV))
    assert enc.mask[:len("A chat") + adds_bos] == [0] * (len("A chat") + adds_bos) and len(enc.mask) == len(enc.ids)
    assert seg.decode(enc.ids) == T.render(CONV)


def test_template_ids_follow_the_sentencepiece_config(sp_dir):
    adds_bos, path = sp_dir
    hf = load_tokenizer(path)
    for seg in (T.SegmentTokenizer.load(path), T.SegmentTokenizer.load(hf)):
        enc = T.encode(CONV, seg)
        assert seg.prefix_ids == ((seg.bos_id,) if adds_bos else ())
        assert enc.ids == hf(T.render(CONV))["input_ids"]  # same as tokenizing the whole string
        assert (enc.ids[0] == seg.bos_id) is adds_bos and len(enc.mask) == len(enc.ids)


def test_training_examples_follow_the_tokenizers_rule(char_tok):
    """The data pipeline's encoder (what training consumes): ids as the tokenizer makes them, mask on answers."""
    from flacuna_jax.data.pipeline import Encoder

    adds_bos, tok = char_tok
    rec = {"id": 0, "conversations": CONV}
    out = Encoder([rec], tok, seq_len=1024, overlong="truncate").encode_record(rec)
    ids, trained = [int(i) for i in out["ids"]], [int(t) for t in out["trained"]]
    assert ids == _expected_ids(tok, T.render(CONV)) and (ids[0] == 1) is adds_bos
    answer_ids = [i for i, t in zip(ids, trained) if t]
    assert answer_ids == tok(" Hello!", add_special_tokens=False)["input_ids"] + [2] + tok(" 4", add_special_tokens=False)["input_ids"] + [2]


def test_generation_and_raw_prompts_follow_the_tokenizers_rule(char_tok):
    from flacuna_jax.generate import Codec

    adds_bos, tok = char_tok
    codec = Codec(tok, (2,))
    ids = codec.prompt("2+2?", history=[("Hi there", "Hello!")])
    assert ids == _expected_ids(tok, T.generation_prompt([("Hi there", "Hello!")], "2+2?"))
    assert ids == T.encode(CONV, T.SegmentTokenizer.load(tok)).ids[:len(ids)]  # a prefix of the training ids
    assert codec.prompt("2+2?", raw=True) == tok("2+2?")["input_ids"] and (ids[0] == 1) is adds_bos


def test_scoring_follows_the_tokenizers_rule(char_tok):
    from flacuna_jax.score import ScoreInputError, request_tokens

    adds_bos, tok = char_tok
    ids, n = request_tokens(tok, "Answer:", " B", 64)
    assert ids == tok("Answer: B")["input_ids"] and n == 2 and (ids[0] == 1) is adds_bos
    if adds_bos:
        assert request_tokens(tok, "", "B", 64) == ([1, tok("B", add_special_tokens=False)["input_ids"][0]], 1)
    else:
        with pytest.raises(ScoreInputError, match="no BOS"):
            request_tokens(tok, "", "B", 64)
