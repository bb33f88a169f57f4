"""``python -m flacuna_jax.data preview|stats|build``: look at the data exactly as training sees it,
or build FLAN-Mini from its sources.

    python -m flacuna_jax.data preview --config CFG [key=value ...] --num 3
        examples after template + mask (before packing); trained spans shown as ⟦...⟧
    python -m flacuna_jax.data preview --config CFG --num 3 --jsonl
        one JSON object per example: {"id", "input_ids", "loss_mask"}, where
        loss_mask[i] is 1 when input_ids[i] is trained (an assistant answer token or its EOS)
    python -m flacuna_jax.data stats --config CFG [key=value ...]
        records, skipped bad records, tokens, truncations/drops, packing efficiency (JSON)

    python -m flacuna_jax.data build --recipe configs/flan_mini.yaml --out DIR [--scale F] [--seed N]
            [--workers N] [--zip] [--tokenizer TOK [--token-sample N]] [--cache-dir DIR]
        FLAN-Mini from its sources (``flan_mini/``): DIR/flan_mini.json (or .json.zip),
        DIR/stats.json and DIR/DATA_CARD.md

Overrides are ``key=value`` with YAML values, e.g. ``data.sources='[{path: a.json, weight: 2}]'``.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from flacuna_jax import templates
from flacuna_jax.data.pipeline import EmptySplit, counts_from_state, pipeline_from_config
from flacuna_jax.data.records import DataError


def _load(args) -> tuple[Any, str]:
    from flacuna_jax.config import load_config
    cfg = load_config(args.config, list(args.overrides))
    tok = cfg.tokenizer.path or cfg.model.path
    if not tok:
        raise DataError("no tokenizer: set tokenizer.path (or model.path)")
    return cfg, tok


def _pipeline(cfg, tok, split="train", epochs=1):
    return pipeline_from_config(cfg.data, tok, seq_len=cfg.train.seq_len, batch_size=1,
                                seed=cfg.seed, split=split, epochs=epochs, drop_remainder=False)


def render_masked(ids: list[int], mask: list[int], tok) -> str:
    """The prompt text with trained spans wrapped in ⟦ ⟧."""
    out, start = [], 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or mask[i] != mask[start]:
            text = tok.decode(ids[start:i]) if start else tok.decode(ids[:i])
            out.append(f"⟦{text}⟧" if mask[start] else text)
            start = i
    return "".join(out)


def preview(args, stdout=None) -> None:
    stdout = stdout or sys.stdout
    cfg, tok_path = _load(args)
    pipe = _pipeline(cfg, tok_path)
    tok = templates.SegmentTokenizer.load(tok_path)
    shown = [pipe.examples[k] for k in range(min(args.num, len(pipe.examples)))]
    if all(ex["drop"] is not None for ex in shown):
        pipe.table  # all shown examples are dropped: raises (one line, with the counts) if nothing trains
    for ex in shown:
        ids, mask = [int(x) for x in ex["ids"]], [int(x) for x in ex["trained"]]
        if args.jsonl:
            stdout.write(json.dumps({"id": ex["id"], "input_ids": ids, "loss_mask": mask}) + "\n")
        else:
            flags = f" dropped={ex['drop']}" if ex["drop"] else ""
            flags += " truncated" if ex["truncated"] else ""
            stdout.write(f"=== {ex['id']}: {len(ids)} tokens, {sum(mask)} trained{flags} ===\n")
            stdout.write(render_masked(ids, mask, tok) + "\n\n")


def stats(args, stdout=None) -> None:
    stdout = stdout or sys.stdout
    cfg, tok_path = _load(args)
    pipe = _pipeline(cfg, tok_path)
    seq_len = cfg.train.seq_len
    it = pipe.iterator(rows=())  # the packing plan alone: every counter, nothing built
    while it.plan_batch() is not None:
        pass
    c = counts_from_state(it.get_state())
    try:
        ev = _pipeline(cfg, tok_path, split="eval").report["epoch_examples"]
    except EmptySplit:  # data.eval_fraction rounds to no held-out record
        ev = 0
    out = {
        "records": sum(s["records"] for s in pipe.report["sources"]),
        "skipped_bad_records": pipe.report["skipped_bad_records"],
        "train_examples_per_epoch": pipe.report["epoch_examples"], "eval_examples": ev,
        "sources": pipe.report["sources"],
        **{k: c[k] for k in ("examples", "tokens", "trained_tokens", "truncated",
                             "dropped_overlong", "dropped_no_target", "skipped_leading_turns",
                             "rows")},
        "seq_len": seq_len, "packing": cfg.data.packing,
        "efficiency_real_tokens": round(c["tokens"] / max(c["row_slots"], 1), 4),
        "efficiency_trained_tokens": round(c["trained_tokens"] / max(c["row_slots"], 1), 4),
        "padding_mode_efficiency": round(c["tokens"] / max(c["examples"] * seq_len, 1), 4),
    }
    stdout.write(json.dumps(out, indent=1) + "\n")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m flacuna_jax.data build",
                                description="Build FLAN-Mini from its sources, as a recipe says.")
    p.add_argument("--recipe", required=True, help="recipe YAML (configs/flan_mini.yaml: the paper's Table 1)")
    p.add_argument("--out", required=True, help="output directory (flan_mini.json, stats.json, DATA_CARD.md)")
    p.add_argument("--scale", type=float, default=1.0, help="multiply every count (0.01: a quick build)")
    p.add_argument("--seed", type=int, default=None, help="sampling and templating seed (default: the recipe's)")
    p.add_argument("--workers", type=int, default=1, help="processes building sources in parallel "
                   "(the output does not depend on it)")
    p.add_argument("--zip", action="store_true", help="write flan_mini.json.zip (the release's layout)")
    p.add_argument("--tokenizer", default=None, help="tokenizer dir for the card's token lengths")
    p.add_argument("--token-sample", type=int, default=None, help="records per source whose tokens are counted "
                   "(the first in key order: a uniform sample; 0: all; default 10000)")
    p.add_argument("--cache-dir", default=None, help="datasets cache (default: datasets' own)")
    return p


def build(argv, stdout=None) -> None:
    from flacuna_jax.data import flan_mini

    args = build_parser().parse_args(argv)
    stats = flan_mini.build(flan_mini.load_recipe(args.recipe), args.out, scale=args.scale, seed=args.seed,
                            workers=args.workers, zip_output=args.zip, tokenizer=args.tokenizer,
                            cache_dir=args.cache_dir,
                            token_sample=flan_mini.mixer.TOKEN_SAMPLE if args.token_sample is None else args.token_sample)
    (stdout or sys.stdout).write(json.dumps(stats["output"]) + "\n")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    commands = ("preview", "stats", "build")
    if not argv or argv[0] not in commands:
        print(f"usage: python -m flacuna_jax.data {{{','.join(commands)}}} --config CFG "
              "[key=value ...] [--num N] [--jsonl]  |  build --recipe R --out DIR [--scale F] [--seed N]",
              file=sys.stderr)
        return 2
    if argv[0] == "build":
        try:
            build(argv[1:])
        except (DataError, ValueError, OSError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        return 0
    p = argparse.ArgumentParser(prog=f"python -m flacuna_jax.data {argv[0]}")
    p.add_argument("--config", required=True)
    p.add_argument("overrides", nargs="*", help="key=value overrides (YAML values)")
    if argv[0] == "preview":
        p.add_argument("--num", type=int, default=3)
        p.add_argument("--jsonl", action="store_true")
    args = p.parse_intermixed_args(argv[1:])
    args.cmd = argv[0]
    try:
        (preview if args.cmd == "preview" else stats)(args)
    except (DataError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
