"""Embedded demo data: a FLAN-Mini-shaped sample and a tiny LLaMA-style tokenizer.

    python -m flacuna_jax.demo_assets --out demo/
    # -> demo/flan_mini_sample.jsonl  (3000 records, same bytes on every run)
    #    demo/tokenizer/              (tokenizer.model, tokenizer_config.json,
    #                                  special_tokens_map.json; AutoTokenizer-loadable)

Records have the FLAN-Mini shape ``{"id", "source", "conversations": [{"from", "value"}]}``
and imitate its mix: zero-shot and few-shot templated tasks (FLAN/T0/NIv2-like), chain of
thought, code, and multi-turn chat. Answers are deterministic functions of the question
(arithmetic, copying, sorting, capitals from a fixed table ...) so that a tiny model learns
them visibly within a hundred small steps. Everything comes from templates and a seeded RNG;
nothing is downloaded.

The tokenizer is a SentencePiece BPE model trained on the sample with the LLaMA settings that
matter for the template: byte fallback, digits split, identity normalisation (whitespace kept
verbatim), dummy prefix, ``<unk>``=0, ``<s>``=1, ``</s>``=2, no pad. The config sets
``legacy: false``: text after ``</s>`` is tokenized without an inserted space, which is how
``flacuna_jax.templates`` builds ids, so the HF tokenizer and the template agree.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random

import sentencepiece as spm

SEED = 1234
NUM_RECORDS = 3000
VOCAB_SIZE = 1024
SAMPLE_NAME = "flan_mini_sample.jsonl"

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid",
    "Japan": "Tokyo", "Canada": "Ottawa", "Egypt": "Cairo", "Kenya": "Nairobi",
    "Peru": "Lima", "Norway": "Oslo", "Greece": "Athens", "India": "New Delhi",
    "China": "Beijing", "Brazil": "Brasilia", "Chile": "Santiago", "Poland": "Warsaw",
}
WORDS = ("apple river stone cloud green music table light bread house water paper "
         "garden window orange silver yellow forest candle rocket tiger planet ocean "
         "winter summer pencil mirror button castle dragon café naïve über").split()
NAMES = ["Tom", "Anna", "Ravi", "Mei", "Lucas", "Sara", "Omar", "Ines"]
ITEMS = ["apples", "books", "coins", "pens", "cards", "shells"]
OPS = {"add": ("+", "the sum of", lambda a, b: a + b),
       "sub": ("-", "the difference of", lambda a, b: a - b),
       "mul": ("*", "the product of", lambda a, b: a * b)}


def _human(v):
    return {"from": "human", "value": v}


def _gpt(v):
    return {"from": "gpt", "value": v}


def _arith(rng):
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    tmpl = rng.choice(["What is {a} + {b}?", "Compute {a} + {b}.", "Add {a} and {b}.",
                       "Question: {a} plus {b} equals what?\nAnswer:"])
    return "flan2021", [_human(tmpl.format(a=a, b=b)), _gpt(f"{a} + {b} = {a + b}")]


def _capital(rng):
    country = rng.choice(sorted(CAPITALS))
    tmpl = rng.choice(["What is the capital of {c}?", "Name the capital city of {c}.",
                       "Which city is the capital of {c}?"])
    return "t0", [_human(tmpl.format(c=country)),
                  _gpt(f"The capital of {country} is {CAPITALS[country]}.")]


def _words(rng, k):
    return [rng.choice(WORDS) for _ in range(k)]


def _niv2(rng):
    kind = rng.randrange(4)
    ws = _words(rng, rng.randint(3, 6))
    if kind == 0:
        q, a = "Reverse the order of these words: " + " ".join(ws), " ".join(reversed(ws))
    elif kind == 1:
        q, a = "Convert to uppercase: " + " ".join(ws), " ".join(ws).upper()
    elif kind == 2:
        q, a = "Copy this text exactly: " + " ".join(ws), " ".join(ws)
    else:
        q, a = "How many words are in this sentence? " + " ".join(ws), f"There are {len(ws)} words."
    return "niv2", [_human("Definition: follow the instruction.\n\nInput: " + q + "\nOutput:"), _gpt(a)]


def _sort(rng):
    xs = [rng.randint(0, 50) for _ in range(rng.randint(3, 7))]
    order = rng.choice(["ascending", "descending"])
    ys = sorted(xs, reverse=order == "descending")
    return "flan2021", [_human(f"Sort these numbers in {order} order: " + ", ".join(map(str, xs))),
                        _gpt(", ".join(map(str, ys)))]


def _few_shot(rng):
    shots = []
    for _ in range(3):
        a, b = rng.randint(0, 20), rng.randint(0, 20)
        shots.append((f"{a} + {b}", a + b))
    lines = "\n".join(f"Q: {q}\nA: {r}" for q, r in shots[:-1])
    return "flan2021_fewshot", [_human(lines + f"\nQ: {shots[-1][0]}\nA:"), _gpt(str(shots[-1][1]))]


def _cot(rng):
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b = rng.randint(2, 30), rng.randint(2, 30)
    if rng.random() < 0.5:
        q = f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?"
        steps = f"{name} starts with {a} {item}. {name} gets {b} more. {a} + {b} = {a + b}."
        ans = a + b
    else:
        a, b = max(a, b), min(a, b)
        q = f"{name} has {a} {item} and gives away {b}. How many {item} are left?"
        steps = f"{name} starts with {a} {item}. {name} gives away {b}. {a} - {b} = {a - b}."
        ans = a - b
    return "cot", [_human(q + " Let's think step by step."), _gpt(steps + f" So the answer is {ans}.")]


def _code(rng):
    name = rng.choice(sorted(OPS))
    sym, phrase, _ = OPS[name]
    x, y = rng.choice([("a", "b"), ("x", "y"), ("m", "n")])
    fn = rng.choice([name, f"{name}_numbers", f"compute_{name}"])
    q = f"Write a Python function {fn}({x}, {y}) that returns {phrase} {x} and {y}."
    a = f"```python\ndef {fn}({x}, {y}):\n    return {x} {sym} {y}\n```"
    return rng.choice(["code_alpaca", "codecontests"]), [_human(q), _gpt(a)]


def _chat(rng):
    conv = [_human("Hello!"), _gpt("Hello! How can I help you today?")]
    for _ in range(rng.randint(1, 3)):
        src, turns = rng.choice([_capital, _arith, _sort])(rng)
        conv += turns
    conv += [_human("Thank you."), _gpt("You are welcome!")]
    return "sharegpt", conv


GENERATORS = [(_arith, 3), (_capital, 2), (_niv2, 3), (_sort, 2), (_few_shot, 2),
              (_cot, 2), (_code, 2), (_chat, 2)]


def make_records(n: int = NUM_RECORDS, seed: int = SEED) -> list[dict]:
    """Deterministic FLAN-Mini-format records."""
    rng = random.Random(seed)
    fns = [f for f, w in GENERATORS for _ in range(w)]
    out = []
    for i in range(n):
        source, conv = rng.choice(fns)(rng)
        out.append({"id": f"demo_{i:05d}", "source": source, "conversations": conv})
    return out


def write_sample(path: str, records: list[dict]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def train_tokenizer_model(records: list[dict], vocab_size: int = VOCAB_SIZE) -> bytes:
    """SentencePiece BPE model bytes, LLaMA-style, deterministic (single thread)."""
    from flacuna_jax import templates  # local import: keep this module light
    sentences = [templates.SYSTEM, "USER: ASSISTANT:"]
    for r in records:
        sentences += [t["value"] for t in r["conversations"]]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=buf, model_type="bpe",
        vocab_size=vocab_size, byte_fallback=True, split_digits=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=True, allow_whitespace_only_pieces=True, character_coverage=1.0,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1,
        shuffle_input_sentence=False, minloglevel=2)
    return buf.getvalue()


TOKENIZER_CONFIG = {
    "tokenizer_class": "LlamaTokenizer",
    "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": None,
    "add_bos_token": True, "add_eos_token": False,
    "legacy": False,  # no space inserted after </s>; matches flacuna_jax.templates
    "clean_up_tokenization_spaces": False,
    "model_max_length": 4096,
}
SPECIAL_TOKENS_MAP = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}


def write_tokenizer_dir(out_dir: str, model_bytes: bytes) -> None:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "tokenizer.model"), "wb") as f:
        f.write(model_bytes)
    for name, obj in (("tokenizer_config.json", TOKENIZER_CONFIG),
                      ("special_tokens_map.json", SPECIAL_TOKENS_MAP)):
        with open(os.path.join(out_dir, name), "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.write("\n")


def write_demo_assets(out: str, n: int = NUM_RECORDS) -> dict[str, str]:
    """Writes the sample and the tokenizer dir under ``out``; returns their paths."""
    os.makedirs(out, exist_ok=True)
    records = make_records(n)
    sample = os.path.join(out, SAMPLE_NAME)
    write_sample(sample, records)
    tok_dir = os.path.join(out, "tokenizer")
    write_tokenizer_dir(tok_dir, train_tokenizer_model(records))
    return {"sample": sample, "tokenizer": tok_dir}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--num", type=int, default=NUM_RECORDS, help="number of records")
    args = p.parse_args(argv)
    paths = write_demo_assets(args.out, args.num)
    print(json.dumps(paths))


if __name__ == "__main__":
    main()
