"""`make demo` steps 5 and 6: the same prompt through transformers (merged export) and through our JAX
decoder (base + PEFT adapter), and a check that both produced the same greedy tokens.

    python scripts/demo_same_tokens.py hf --merged DIR --prompt TEXT --max-new-tokens N --out hf.json
    python -m flacuna_jax.generate --model BASE --adapter PEFT --data prompt.jsonl --out ours.jsonl ...
    python scripts/demo_same_tokens.py check hf.json ours.jsonl

`hf` renders the Vicuna v1.1 generation prompt (the ids `generate` feeds), decodes greedily with
`LlamaForCausalLM.generate`, prints the exchange and writes {"prompt", "tokens"} (the new ids, up to
and including EOS when it came). `prompt` writes the one-line JSONL `generate --data` reads. `check`
compares those tokens with the "tokens" of `generate --data`'s output line: prints "the same N
tokens" and exits 0, or names the first position where they differ and exits 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def hf_tokens(merged: str, prompt: str, max_new_tokens: int) -> list[int]:
    import torch
    from transformers import LlamaForCausalLM

    from flacuna_jax import templates
    from flacuna_jax.tokenizer import load_tokenizer

    tok = load_tokenizer(merged)
    model = LlamaForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    ids = templates.encode_generation_prompt([], prompt, templates.SegmentTokenizer.load(tok))
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.eos_token_id)
    new = [int(t) for t in out[0, len(ids):]]
    print(f"USER: {prompt}\nASSISTANT: {tok.decode(new, skip_special_tokens=True)}")
    return new


def first_difference(a: list[int], b: list[int]) -> int | None:
    """The first position where the two token lists differ (a length difference included), else None."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def check(hf_json: Path, ours_jsonl: Path) -> int:
    theirs = json.loads(hf_json.read_text())
    [ours] = [json.loads(line) for line in ours_jsonl.read_text().splitlines() if line.strip()]
    if ours["prompt"] != theirs["prompt"]:
        print(f"error: {ours_jsonl} answers another prompt ({ours['prompt']!r})", file=sys.stderr)
        return 1
    at = first_difference(theirs["tokens"], ours["tokens"])
    if at is not None:
        print(f"error: the tokens differ at new token {at}: transformers {theirs['tokens'][at:at + 5]}, "
              f"flacuna_jax {ours['tokens'][at:at + 5]} ({len(theirs['tokens'])} vs {len(ours['tokens'])} tokens)",
              file=sys.stderr)
        return 1
    print(f"the same {len(ours['tokens'])} tokens from transformers (merged export) and flacuna_jax (base + PEFT adapter)")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    h = sub.add_parser("hf", help="greedy tokens of transformers on the merged export")
    h.add_argument("--merged", required=True)
    h.add_argument("--prompt", required=True)
    h.add_argument("--max-new-tokens", type=int, default=40)
    h.add_argument("--out", required=True, type=Path)
    q = sub.add_parser("prompt", help="the prompt as the JSONL `generate --data` reads")
    q.add_argument("--prompt", required=True)
    q.add_argument("--out", required=True, type=Path)
    c = sub.add_parser("check", help="exit 1 unless both token lists are the same")
    c.add_argument("hf_json", type=Path)
    c.add_argument("ours_jsonl", type=Path)
    a = p.parse_args(argv)
    if a.command == "hf":
        a.out.write_text(json.dumps({"prompt": a.prompt, "tokens": hf_tokens(a.merged, a.prompt, a.max_new_tokens)}))
        return 0
    if a.command == "prompt":
        a.out.write_text(json.dumps({"prompt": a.prompt}) + "\n")
        return 0
    return check(a.hf_json, a.ours_jsonl)


if __name__ == "__main__":
    sys.exit(main())
