"""The data card of a build: ``stats.json`` (machine-readable) and ``DATA_CARD.md`` (the same, for people).

Records per source and per task; zero-shot / few-shot and with / without answer options (FLAN's
``template_type``, ours for the templated code sources; Alpaca and ShareGPT are "as published");
characters and, with a tokenizer, Vicuna-template token lengths (as ``train`` encodes them, on every
record or a uniform sample of each source) at the 50/90/95/99th percentile and the share over 1280
(the paper's ``seq_len``) and 2048; the recipe as
written, its scale and seed. Nothing in either file depends on the output directory, the clock or
the number of workers, so two builds of the same recipe and seed have identical cards.
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter

import numpy as np

from flacuna_jax.data.flan_mini.recipe import Recipe

PERCENTILES = (50, 90, 95, 99)
SEQ_LENS = (1280, 2048)


def _lengths(values, weights=None, seq_lens=()) -> dict:
    """Percentiles (inverted CDF: values that occur), max, mean and total of ``values``, each value
    standing for ``weights`` records (a per-source sample stands for the whole source)."""
    a = np.asarray(values, np.int64)
    if not len(a):
        return {}
    w = np.ones(len(a)) if weights is None else np.asarray(weights, np.float64)
    order = np.argsort(a, kind="stable")
    a, w = a[order], w[order]
    cum = np.cumsum(w)
    out = {f"p{q}": int(a[min(len(a) - 1, int(np.searchsorted(cum, q / 100 * cum[-1] * (1 - 1e-12))))])
           for q in PERCENTILES}
    mean = float((a * w).sum() / cum[-1])
    out.update(max=int(a.max()), mean=round(mean, 1), total=int(round((a * w).sum())))
    for n in seq_lens:
        out[f"over_{n}"] = round(float(w[a > n].sum() / cum[-1]), 4)
    return out


def _exact_total(d: dict, records: int) -> dict:
    """A total measured on a sample is an estimate and says so."""
    if d.get("records_measured", records) != records and "total" in d:
        d["estimated_total"] = d.pop("total")
    return d


def _shots(kind: str) -> str:
    return {"zs": "zero_shot", "fs": "few_shot"}.get(kind[:2], "as_published" if kind == "as_published" else "other")


def _options(kind: str) -> str:
    if kind.endswith("_noopt"):
        return "without_options"
    if kind.endswith("_opt"):
        return "with_options"
    return "as_published" if kind == "as_published" else "other"


def stats(recipe: Recipe, scale: float, seed: int, shards, output: str, json_sha256: str,
          tokenizer: str | None, token_sample: int = 0) -> dict:
    sources, shots, options, kinds = {}, Counter(), Counter(), Counter()
    chars, tokens, token_weights = [], [], []
    for e, s in zip([e for e in recipe.entries if e.count > 0], shards):
        per_shots, per_options = Counter(), Counter()
        for kind, n in s.template_types.items():
            per_shots[_shots(kind)] += n
            per_options[_options(kind)] += n
            kinds[kind] += n
        shots.update(per_shots)
        options.update(per_options)
        sources[e.name] = {
            "path": e.path, "reader": e.reader, "asked": s.asked, "records": s.records, "took_all": s.took_all,
            "units_in_source": s.units, "rows_in_source": s.rows, "skipped_bad_rows": s.skipped_rows,
            "skip_examples": s.skip_examples, "tasks": s.tasks, "template_types": s.template_types,
            "shots": dict(sorted(per_shots.items())), "options": dict(sorted(per_options.items())),
            "exemplars_per_record": s.shots, "chars": _lengths(s.chars),
        }
        if s.tokens is not None:
            sources[e.name]["tokens"] = _exact_total({"records_measured": len(s.tokens),
                                                      **_lengths(s.tokens, seq_lens=SEQ_LENS)}, s.records)
            tokens.extend(s.tokens)
            token_weights.extend([s.records / max(len(s.tokens), 1)] * len(s.tokens))
        chars.extend(s.chars)
    records = sum(v["records"] for v in sources.values())
    out = {
        "output": {"file": output, "records": records, "json_sha256": json_sha256},
        "recipe": {"file": recipe.file, "sha256": recipe.sha256, "description": recipe.description,
                   "scale": scale, "seed": seed, "entries": [dataclasses.asdict(e) for e in recipe.entries]},
        "sources": sources,
        "shots": dict(sorted(shots.items())), "options": dict(sorted(options.items())),
        "template_types": dict(sorted(kinds.items())),
        "chars": _lengths(chars),
    }
    if tokenizer:
        measured = len(tokens)
        out["tokens"] = {"tokenizer": tokenizer, "template": "vicuna_v1.1", "records_measured": measured,
                         "sample": "all records" if measured == records else
                         f"the first {token_sample} records of each source in key order (uniform), "
                         "weighted by source size",
                         **_lengths(tokens, token_weights, SEQ_LENS)}
        _exact_total(out["tokens"], records)
    return out


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def markdown(st: dict, recipe: Recipe) -> str:
    r, o = st["recipe"], st["output"]
    cmd = f"python -m flacuna_jax.data build --recipe {r['file'] or 'RECIPE'} --out DIR --seed {r['seed']}"
    cmd += f" --scale {r['scale']:g}" if r["scale"] != 1 else ""
    parts = [
        "# FLAN-Mini build: data card", "",
        (r["description"].strip() + "\n") if r["description"] else "",
        f"`{o['file']}`: {o['records']} records `{{\"id\", \"source\", \"conversations\"}}`; the JSON's "
        f"sha256 is `{o['json_sha256']}`.", "",
        f"Built by `{cmd}` (recipe sha256 `{r['sha256'][:16]}`). The same recipe and seed rebuild these bytes.", "",
        "## Sources", "",
        _table(["source", "reader", "path", "asked", "records", "units in source", "bad rows skipped", "note"],
               [[n, s["reader"], f"`{s['path']}`", s["asked"], s["records"], s["units_in_source"],
                 s["skipped_bad_rows"], "took all there was (allow_fewer)" if s["took_all"] else ""]
                for n, s in st["sources"].items()]), "",
        "## Tasks", "",
        _table(["source", "task", "records"],
               [[n, t, c] for n, s in st["sources"].items() for t, c in s["tasks"].items()]), "",
        "## Prompt formats", "",
        "Zero-shot or few-shot, and whether a multiple-choice prompt lists its options (FLAN's template types; "
        "Alpaca and ShareGPT records are as published).", "",
        _table(["source", "zero-shot", "few-shot", "with options", "without options", "as published"],
               [[n, s["shots"].get("zero_shot", 0), s["shots"].get("few_shot", 0),
                 s["options"].get("with_options", 0), s["options"].get("without_options", 0),
                 s["shots"].get("as_published", 0)] for n, s in st["sources"].items()]
               + [["**all**", st["shots"].get("zero_shot", 0), st["shots"].get("few_shot", 0),
                   st["options"].get("with_options", 0), st["options"].get("without_options", 0),
                   st["shots"].get("as_published", 0)]]), "",
        "## Lengths", "",
    ]
    q = [f"p{x}" for x in PERCENTILES] + ["max"]
    rows = [[n] + [s["chars"].get(k, "") for k in q] for n, s in st["sources"].items()]
    parts += ["Characters per record (all turns):", "",
              _table(["source"] + q, rows + [["**all**"] + [st["chars"].get(k, "") for k in q]]), ""]
    if "tokens" in st:
        t = st["tokens"]
        over = [f"over_{n}" for n in SEQ_LENS]
        rows = [[n] + [s["tokens"].get(k, "") for k in q + over] for n, s in st["sources"].items()]
        parts += [f"Tokens per record in the Vicuna v1.1 template as `train` encodes it (tokenizer `{t['tokenizer']}`; "
                  f"measured on {t['sample']}):",
                  "", _table(["source"] + q + [f"share > {n}" for n in SEQ_LENS],
                             rows + [["**all**"] + [t.get(k, "") for k in q + over]]), ""]
    skips = [(n, x) for n, s in st["sources"].items() for x in s["skip_examples"]]
    if skips:
        parts += ["## Skipped rows (first examples)", ""] + [f"- {n}: {x}" for n, x in skips] + [""]
    parts += ["## Recipe", "", "```yaml", recipe.text.rstrip("\n"), "```", ""]
    return "\n".join(parts)


def write(st: dict, recipe: Recipe, stats_path: str, card_path: str) -> None:
    with open(stats_path, "w", encoding="utf-8") as f:
        json.dump(st, f, indent=1, ensure_ascii=False)
        f.write("\n")
    with open(card_path, "w", encoding="utf-8") as f:
        f.write(markdown(st, recipe))
