"""Vicuna v1.1 template: golden strings, exact masks, equality with full-string tokenization.

The golden strings are FastChat's: fastchat/conversation.py `get_conv_template("vicuna_v1.1")` as
fastchat/train/train.py's `preprocess` fills it, at FastChat v0.2.18 (commit d578599c, 5 July 2023;
v0.2.36, b21d0f78, renders them the same). `scripts/fastchat_template_check.py --fastchat DIR` renders
GOLDEN and GENERATION_GOLDEN with FastChat's own code from a checkout and says whether they still agree.
"""

import pytest

from flacuna_jax import templates as T
from tests.conftest_data import demo_dir, hf_tokenizer, sample_path, sample_records, tokenizer_dir  # noqa: F401

S = T.SYSTEM


def h(v):
    return {"from": "human", "value": v}


def g(v):
    return {"from": "gpt", "value": v}


def trained_spans(ids, mask):
    """Maximal runs of trained tokens, as id lists."""
    spans, cur = [], []
    for i, m in zip(ids, mask):
        if m:
            cur.append(i)
        elif cur:
            spans.append(cur)
            cur = []
    if cur:
        spans.append(cur)
    return spans


GOLDEN = [
    ("single", [h("Hi"), g("Hello!")], S + " USER: Hi ASSISTANT: Hello!</s>", ["Hello!"], 0),
    ("multi", [h("Hi"), g("Hello!"), h("2+2?"), g("4")],
     S + " USER: Hi ASSISTANT: Hello!</s>USER: 2+2? ASSISTANT: 4</s>", ["Hello!", "4"], 0),
    ("system", [{"from": "system", "value": "Be brief."}, h("Hi"), g("Yo")],
     "Be brief. USER: Hi ASSISTANT: Yo</s>", ["Yo"], 0),
    ("leading_gpt", [g("I start."), h("Hi"), g("Hello!")],
     S + " USER: Hi ASSISTANT: Hello!</s>", ["Hello!"], 1),
    ("empty_answer", [h("Hi"), g(""), h("Again"), g("Ok")],
     S + " USER: Hi ASSISTANT:USER: Again ASSISTANT: Ok</s>", ["Ok"], 0),
    ("empty_question", [h(""), g("Ok")], S + " USER:ASSISTANT: Ok</s>", ["Ok"], 0),
    ("unicode", [h("Ünïcødé? 日本"), g("Oui, café 😀 — ok.")],
     S + " USER: Ünïcødé? 日本 ASSISTANT: Oui, café 😀 — ok.</s>", ["Oui, café 😀 — ok."], 0),
    ("aliases", [{"from": "user", "value": "Hi"}, {"from": "assistant", "value": "Hey"}],
     S + " USER: Hi ASSISTANT: Hey</s>", ["Hey"], 0),
    ("spaces", [h("a  b"), g("  x \n")], S + " USER: a  b ASSISTANT:   x \n</s>", ["  x \n"], 0),
]


@pytest.mark.parametrize("name,conv,expected,answers,skipped", GOLDEN, ids=[x[0] for x in GOLDEN])
def test_golden(name, conv, expected, answers, skipped, tokenizer_dir, hf_tokenizer):
    assert T.render(conv) == expected
    tok = T.SegmentTokenizer.load(tokenizer_dir)
    enc = T.encode(conv, tok)
    assert enc.skipped_leading == skipped
    assert enc.ids[0] == tok.bos_id and enc.mask[0] == 0
    assert len(enc.ids) == len(enc.mask)
    assert tok.decode(enc.ids) == expected
    assert enc.ids == hf_tokenizer(expected).input_ids  # same as tokenizing the whole string
    spans = trained_spans(enc.ids, enc.mask)
    assert [tok.decode(s) for s in spans] == [" " + a + "</s>" for a in answers]
    assert all(s[-1] == tok.eos_id and tok.eos_id not in s[:-1] for s in spans)


def test_golden_masks_hand_checked(tokenizer_dir):
    """Masks spelled out: everything up to 'ASSISTANT:' is 0, answer + EOS are 1."""
    tok = T.SegmentTokenizer.load(tokenizer_dir)
    prompt = T.encode_generation_prompt([], "Hi", tok)
    answer = tok.encode_texts([" Hello!"], first=False)[0]
    enc = T.encode([h("Hi"), g("Hello!")], tok)
    assert enc.ids == prompt + answer + [tok.eos_id]
    assert enc.mask == [0] * len(prompt) + [1] * (len(answer) + 1)


GENERATION_GOLDEN = [  # (history, question, system or None, FastChat's prompt with the assistant's message None)
    ([("Hi", "Hello!")], "How are you?", None, S + " USER: Hi ASSISTANT: Hello!</s>USER: How are you? ASSISTANT:"),
    ([], "Q", "Sys", "Sys USER: Q ASSISTANT:"),
]


@pytest.mark.parametrize("history,question,system,expected", GENERATION_GOLDEN)
def test_generation_prompt(history, question, system, expected):
    kw = {} if system is None else {"system": system}
    assert T.generation_prompt(history, question, **kw) == expected


def test_generation_prompt_ids_prefix_training_ids(tokenizer_dir):
    tok = T.SegmentTokenizer.load(tokenizer_dir)
    conv = [h("Hi"), g("Hello!"), h("2+2?"), g("4")]
    prompt = T.encode_generation_prompt([("Hi", "Hello!")], "2+2?", tok)
    full = T.encode(conv, tok)
    assert full.ids[:len(prompt)] == prompt
    assert full.mask[len(prompt) - 1] == 0 and full.mask[len(prompt)] == 1  # answer starts next


@pytest.mark.parametrize("conv,msg", [
    ([{"from": "bot", "value": "x"}], "unknown role 'bot'"),
    ([h(3)], "value is int"),
    ([h("a"), h("b")], "roles must alternate"),
    ([h("a"), g("b"), {"from": "system", "value": "s"}], "system turn must come first"),
])
def test_bad_conversations(conv, msg):
    with pytest.raises(T.ConversationError, match=msg):
        T.render(conv)


def test_whole_sample_zero_mismatches(sample_records, tokenizer_dir, hf_tokenizer):
    """Every sample conversation: ids == full-string tokenization, exact decode, spans = answers."""
    tok = T.SegmentTokenizer.load(tokenizer_dir)
    texts = [T.render(r["conversations"]) for r in sample_records]
    reference = hf_tokenizer(texts)["input_ids"]
    mismatches = 0
    for r, text, ref in zip(sample_records, texts, reference):
        enc = T.encode(r["conversations"], tok)
        answers = [t["value"] for t in r["conversations"][enc.skipped_leading:] if t["from"] == "gpt"]
        spans = [tok.decode(s) for s in trained_spans(enc.ids, enc.mask)]
        ok = (enc.ids == ref and tok.decode(enc.ids) == text
              and spans == [" " + a + "</s>" for a in answers if a])
        mismatches += not ok
    assert mismatches == 0


def test_char_level_hf_tokenizer_fallback(tmp_path):
    from tests.helpers import write_char_tokenizer
    tok = T.SegmentTokenizer.load(str(write_char_tokenizer(tmp_path)))
    conv = [h("Hi"), g("Yo!"), h("More"), g("Ok")]
    enc = T.encode(conv, tok)
    assert tok.decode(enc.ids) == T.render(conv)
    assert [tok.decode(s) for s in trained_spans(enc.ids, enc.mask)] == [" Yo!</s>", " Ok</s>"]
