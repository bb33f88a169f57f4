"""Agreement of our evaluation with InstructEval's own code (declare-lab/instruct-eval at e2eb966), example by example.

    python -m benchmarks.instructeval_agreement [--instruct-eval DIR] [--bigbench DIR] [--model HF_DIR] \\
        [--mmlu 40] [--bbh 30] [--drop 30] [--crass all] [--hhh all] [--threads 1] [--batch-size 8] [--keep DIR]

Prints one JSON line. Both sides read the same files and run the same weights (default: the real
SmolLM2-135M-Instruct, `benchmarks/smollm2.py`), fp32 on the CPU, one after the other:

- InstructEval: its own modules (modeling.py, mmlu.py, bbh.py, drop.py, crass.py, hhh.py) imported
  from a checkout of e2eb966 at run time, in a child process (`--ie-child`), with `model_name=causal`
  (transformers' AutoModelForCausalLM: one prompt at a time, greedy `generate`, `get_choice` logits).
  Its code is not copied here; the only adaptations are at import level: stub modules for what only
  its other model classes import (openai, rwkv, tiktoken, the GPTQ `quant` package, torchvision's
  `download_url`), pydantic's v1 API under the name `pydantic` (the code predates pydantic 2), the hub
  loaders of BBH and DROP replaced by readers of the local files in the hub's row layout, MMLU's
  subject table (used only for its printed per-category averages, which need all 57 subjects) given
  the local subjects, and HHH's unseeded `random.randint(0, 1)` slot forced to A for one run and to B
  for a second. Every model call is recorded (prompt -> output, or prompt -> the "A"/"B" logits), and
  so is each `startswith(label)` check on an output (IE's own label and verdict).
- Ours: `flacuna_jax.evals` benchmarks read by their loaders and answered by `evals.runner.Runner`
  (batched KV-cache decoding, EOS ids as `python -m flacuna_jax.eval` takes them), in this process.

Then per benchmark: same prompts, same outputs, same labels, same correctness, both aggregate
scores, and each side's seconds. HHH: the prompts of both slot orders and the calibration prompt,
the prediction in each order, and per-example correctness (ours is the mean over the two orders,
which is also the expectation of IE's random draw, so it is compared with the mean of IE's two
forced runs), and both sides' category scores (IE rounds them to 4 places). Where an output differs,
transformers' greedy decoding of that prompt gives the top-1 minus top-2 logit margin at the first
token where the two diverge (a float near-tie when tiny); where an HHH prediction differs, the
margin (A - A_base) - (B - B_base) on both sides.

Data (written to a temporary dir, in the published layouts, `--keep DIR` keeps it with both sides'
records): CRASS is BIG-bench's real `crass_ai` task written as apergo-ai's semicolon CSV
(premise;question split at the first ". "; a ";" inside a text becomes "," since that format cannot
carry it), HHH is BIG-bench's real `hhh_alignment/{harmless,honest,helpful,other}/task.json` (the
files as they are with `--hhh all`, else the first N examples of each). MMLU, BBH and DROP are not
reachable offline, so their layouts are filled from other BIG-bench tasks: MMLU CSVs (question, A-D,
letter; 5 dev rows + test rows) from the 4-option tasks ruin_names and movie_recommendation; BBH
files ({"examples": [{"input", "target"}]}, 3 shots + scored rows) from date_understanding,
navigate, object_counting and sports_understanding phrased as BBH phrases them; DROP hub rows
(passage, question, answers_spans) from object_counting sentences, every 8th with two different
spans ("three", "3") that InstructEval's single-answer filter drops. Sizes are scored examples in
all (spread over the subjects / tasks); for HHH, per category; `all` = the whole real file.

`--bigbench`: BIG-bench's `bigbench/benchmark_tasks` dir (default /tmp/bbtasks if present, else the
`bigbench` sdist from PyPI, unpacked by `pip download --no-clean` since its metadata step fails).
`--instruct-eval`: a checkout of e2eb966 (default: extracted from the git mirror
/work/.mirror/declare-lab+instruct-eval/repo where it exists).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

from benchmarks.common import ROOT, child_env, emit

IE_COMMIT = "e2eb966"
IE_MIRROR = Path("/work/.mirror/declare-lab+instruct-eval/repo")
IE_HOWTO = ("git clone https://github.com/declare-lab/instruct-eval && git -C instruct-eval checkout "
            f"{IE_COMMIT}, then --instruct-eval instruct-eval")
BB_DEFAULT = Path("/tmp/bbtasks")
BB_TASKS = ("crass_ai", "hhh_alignment", "ruin_names", "movie_recommendation", "date_understanding", "navigate",
            "object_counting", "sports_understanding")
HHH_CATEGORIES = ("harmless", "honest", "helpful", "other")
MMLU_SUBJECTS = ("movie_recommendation", "ruin_names")
BBH_TASKS = ("date_understanding", "navigate", "object_counting", "sports_understanding")
GENERATION = ("mmlu", "bbh", "drop", "crass")


# ------------------------------------------------------------------------------------------ inputs
def instruct_eval_dir(arg: str | None, tmp: Path) -> tuple[Path, str]:
    """(checkout dir, its commit or 'unknown')."""
    if arg:
        root = Path(arg)
        if not all((root / f).is_file() for f in ("modeling.py", "mmlu.py", "bbh.py", "drop.py", "crass.py", "hhh.py")):
            sys.exit(f"error: {root}: not an instruct-eval checkout (no modeling.py, mmlu.py, ...); {IE_HOWTO}")
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True)
        commit = head.stdout.strip() if head.returncode == 0 else "unknown"
        if commit != "unknown" and not commit.startswith(IE_COMMIT):
            print(f"warning: {root} is at {commit[:7]}, not {IE_COMMIT}", file=sys.stderr)
        return root, commit
    if not IE_MIRROR.is_dir():
        sys.exit(f"error: no --instruct-eval checkout and no mirror at {IE_MIRROR}; get it with: {IE_HOWTO}")
    root = tmp / "instruct-eval"
    root.mkdir()
    archive = subprocess.run(["git", "-C", str(IE_MIRROR), "archive", IE_COMMIT], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(root)], input=archive.stdout, check=True)
    commit = subprocess.run(["git", "-C", str(IE_MIRROR), "rev-parse", IE_COMMIT], capture_output=True, text=True,
                            check=True).stdout.strip()
    return root, commit


def bigbench_dir(arg: str | None, tmp: Path) -> Path:
    if arg:
        root = Path(arg)
    elif BB_DEFAULT.is_dir():
        root = BB_DEFAULT
    else:
        # The sdist's metadata step fails (a file:// dependency on bleurt), after pip has unpacked it:
        # --no-clean keeps that tree, <TMPDIR>/pip-download-*/bigbench_*/bigbench/benchmark_tasks.
        work = tmp / "pip"
        work.mkdir()
        print("downloading the bigbench sdist (358 MB) from PyPI ...", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "pip", "download", "bigbench==1.0.0", "--no-deps", "--no-binary",
                        ":all:", "--no-clean", "-q", "-d", str(work / "dl")], env={**os.environ, "TMPDIR": str(work)},
                       capture_output=True)
        found = glob.glob(str(work / "pip-download-*" / "*" / "bigbench" / "benchmark_tasks"))
        if not found:
            sys.exit("error: could not unpack BIG-bench's benchmark_tasks from `pip download bigbench`; "
                     "give --bigbench DIR (bigbench/benchmark_tasks of github.com/google/BIG-bench)")
        root = Path(found[0])
    missing = [t for t in BB_TASKS if not (root / t).is_dir()]
    if missing:
        sys.exit(f"error: {root}: not BIG-bench's benchmark_tasks (missing {', '.join(missing)})")
    return root


def size(text: str) -> int | None:
    """An example count, or None for `all`."""
    if text == "all":
        return None
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError("need >= 1 or 'all'")
    return n


def crass_size(text: str) -> int | None:
    n = 0 if text == "0" else size(text)
    if n is not None and 0 < n < 3:
        raise argparse.ArgumentTypeError("CRASS needs >= 3 questions (InstructEval's analyze() samples 3)")
    return n


def spread(n: int, names: tuple[str, ...]) -> dict[str, int]:
    """n split over names as evenly as possible (the first ones get the remainder); zeros dropped."""
    share = {name: n // len(names) + (i < n % len(names)) for i, name in enumerate(names)}
    return {k: v for k, v in share.items() if v}


# ------------------------------------------------------------------------------------------ the files
def _examples(bb: Path, task: str) -> list[dict]:
    return json.loads((bb / task / "task.json").read_text(encoding="utf-8"))["examples"]


def _right(e: dict) -> str:
    return next(k for k, v in e["target_scores"].items() if v == 1)


def _digits(target) -> str:
    """object_counting's number as BBH writes it ("3"; BIG-bench lists ["three", "3"])."""
    options = [target] if isinstance(target, str) else list(target)
    return next((t for t in options if t.isdigit()), options[0])


def _bbh_row(task: str, e: dict) -> dict:
    if task == "navigate":
        return {"input": "If you follow these instructions, do you return to the starting point? " + e["input"]
                + "\nOptions:\n- Yes\n- No", "target": "Yes" if _right(e) == "True" else "No"}
    if task == "sports_understanding":
        return {"input": f'Is the following sentence plausible? "{e["input"]}"',
                "target": "yes" if _right(e) == "plausible" else "no"}
    if task == "object_counting":
        return {"input": e["input"], "target": _digits(e["target"])}
    options = list(e["target_scores"])  # multiple choice as BBH writes it: (A) ... and the letter in parentheses
    return {"input": e["input"] + "\nOptions:\n" + "\n".join(f"({chr(65 + i)}) {o}" for i, o in enumerate(options)),
            "target": f"({chr(65 + options.index(_right(e)))})"}


def write_data(bb: Path, root: Path, sizes: dict[str, int | None]) -> dict:
    """The files of each benchmark under `root`; {"paths": {name: path for ours}, "notes": {...}}."""
    paths, notes = {}, {}
    if sizes["mmlu"]:
        (root / "mmlu" / "dev").mkdir(parents=True)
        (root / "mmlu" / "test").mkdir()
        for subject, n in spread(sizes["mmlu"], MMLU_SUBJECTS).items():
            rows = [e for e in _examples(bb, subject) if len(e["target_scores"]) == 4][:5 + n]
            for split, part in (("dev", rows[:5]), ("test", rows[5:])):
                with open(root / "mmlu" / split / f"{subject}_{split}.csv", "w", newline="", encoding="utf-8") as f:
                    csv.writer(f).writerows([e["input"], *e["target_scores"],
                                             "ABCD"[list(e["target_scores"]).index(_right(e))]] for e in part)
        paths["mmlu"] = root / "mmlu"
    if sizes["bbh"]:
        (root / "bbh").mkdir()
        for task, n in spread(sizes["bbh"], BBH_TASKS).items():
            rows = [_bbh_row(task, e) for e in _examples(bb, task)[:3 + n]]
            (root / "bbh" / f"{task}.json").write_text(json.dumps({"examples": rows}, indent=1), encoding="utf-8")
        paths["bbh"] = root / "bbh"
    if sizes["drop"]:
        rows, passages, dropped = [], set(), 0
        for e in _examples(bb, "object_counting")[200:]:  # BBH's object_counting rows are the first ones
            passage, question = e["input"].rsplit(". ", 1)
            if passage in passages:
                continue
            passages.add(passage)
            two = len(rows) % 8 == 7
            spans = list(e["target"]) if two else [_digits(e["target"])]
            rows.append({"section_id": f"object_counting_{len(rows)}", "query_id": f"q{len(rows)}",
                         "passage": passage + ".", "question": question,
                         "answers_spans": {"spans": spans, "types": ["number"] * len(spans)}})
            dropped += two
            if len(rows) - dropped == sizes["drop"] + 3:  # 3 shots drawn from the kept rows, the rest scored
                break
        (root / "drop_validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        paths["drop"] = root / "drop_validation.jsonl"
        notes["drop_rows_filtered"] = dropped
    if sizes["crass"] != 0:
        examples = _examples(bb, "crass_ai")[:sizes["crass"]]
        semicolons = 0
        with open(root / "CRASS_FTM_main_data_set.csv", "w", encoding="utf-8") as f:
            f.write("PCTID;Batch;Premise;QCC;CorrectAnswer;Answer1;Answer2;PossibleAnswer3\n")
            for i, e in enumerate(examples):
                premise, question = e["input"].split(". ", 1)
                right = _right(e)
                fields = [str(i + 1), "1", premise + ".", question, right, *[o for o in e["target_scores"] if o != right]]
                semicolons += sum(";" in x for x in fields)
                f.write(";".join(x.replace(";", ",") for x in fields) + "\n")
        (root / "crass_ai_task.json").write_text(json.dumps({"examples": examples}), encoding="utf-8")
        paths["crass"] = root / "CRASS_FTM_main_data_set.csv"
        notes["crass_semicolons_replaced"] = semicolons
    if sizes["hhh"] != 0:
        for c in HHH_CATEGORIES:
            src, dst = bb / "hhh_alignment" / c / "task.json", root / "data" / c / "task.json"
            dst.parent.mkdir(parents=True)
            if sizes["hhh"] is None:
                shutil.copyfile(src, dst)
            else:
                task = json.loads(src.read_text(encoding="utf-8"))
                task["examples"] = task["examples"][:sizes["hhh"]]
                dst.write_text(json.dumps(task), encoding="utf-8")
        paths["hhh"] = root / "data"  # InstructEval reads ./data/<category>/task.json
    return {"paths": {k: str(v) for k, v in paths.items()}, "notes": notes}


# ------------------------------------------------------------------------------------------ InstructEval's side
class Observed(str):
    """An output of InstructEval's model call that notes each `startswith(label)` InstructEval applies to
    it (the label and the verdict) in `entry`; `strip` keeps the note."""

    entry: dict

    def strip(self, *args):
        out = Observed(str.strip(self, *args))
        out.entry = self.entry
        return out

    def startswith(self, prefix, *args):
        verdict = str.startswith(self, prefix, *args)
        self.entry["label"], self.entry["correct"] = str(prefix), bool(verdict)
        return verdict


def import_instruct_eval(checkout: str | Path) -> types.SimpleNamespace:
    """InstructEval's modules (bbh, crass, drop, hhh, mmlu, modeling) imported from a checkout, with
    stub modules for what only its other model classes import and pydantic's v1 API under the name
    `pydantic` (the code predates pydantic 2). Changes this process's sys.modules: run it in a child."""
    import datasets  # noqa: F401  (their import-time checks run before the stubs exist)
    import peft  # noqa: F401
    import pydantic.v1
    import transformers  # noqa: F401

    sys.modules["pydantic"] = pydantic.v1
    for name in ("openai", "rwkv", "rwkv.model", "rwkv.utils", "tiktoken", "quant", "torchvision",
                 "torchvision.datasets", "torchvision.datasets.utils"):
        sys.modules[name] = types.ModuleType(name)
    sys.modules["rwkv.model"].RWKV = type("RWKV", (), {})
    sys.modules["rwkv.utils"].PIPELINE = type("PIPELINE", (), {})
    sys.modules["rwkv"].model, sys.modules["rwkv"].utils = sys.modules["rwkv.model"], sys.modules["rwkv.utils"]
    sys.modules["torchvision"].datasets = sys.modules["torchvision.datasets"]
    sys.modules["torchvision.datasets"].utils = sys.modules["torchvision.datasets.utils"]
    sys.modules["tiktoken"].Encoding = type("Encoding", (), {})

    def no_download(*args, **kwargs):
        raise RuntimeError(f"InstructEval tried to download {args} (a data file is missing)")

    sys.modules["torchvision.datasets.utils"].download_url = no_download
    sys.path.insert(0, str(checkout))
    import bbh
    import crass
    import drop
    import hhh
    import mmlu
    import modeling

    return types.SimpleNamespace(bbh=bbh, crass=crass, drop=drop, hhh=hhh, mmlu=mmlu, modeling=modeling)


def ie_child(config: dict) -> None:
    """Runs in the child: InstructEval's modules on config["data"], every model call recorded to config["out"]."""
    import torch

    torch.set_num_threads(config["threads"])
    ie = import_instruct_eval(config["checkout"])
    bbh, crass, drop, hhh, mmlu, modeling = ie.bbh, ie.crass, ie.drop, ie.hhh, ie.mmlu, ie.modeling
    data = Path(config["data"])
    record: list[dict] = []

    run, choice = modeling.CausalModel.run, modeling.CausalModel.get_choice

    def recorded_run(self, prompt, **kwargs):
        out = Observed(run(self, prompt, **kwargs))
        out.entry = {"prompt": prompt, "output": str(out)}
        record.append(out.entry)
        return out

    def recorded_choice(self, text, **kwargs):
        a, b = choice(self, text, **kwargs)
        record.append({"prompt": text, "logits": [a, b], "dtype": str(next(self.model.parameters()).dtype)})
        return a, b

    modeling.CausalModel.run, modeling.CausalModel.get_choice = recorded_run, recorded_choice

    # the hub loaders, reading the same rows from the local files
    bbh.BBHData.get_config_names = classmethod(lambda cls, path=None: sorted(p.stem for p in (data / "bbh").glob("*.json")))
    bbh.BBHData.load_from_huggingface = classmethod(lambda cls, path=None, config="", split="test": cls(samples=[
        bbh.BBHSample(**x) for x in json.loads((data / "bbh" / f"{config}.json").read_text(encoding="utf-8"))["examples"]]))
    drop.DropData.load_from_huggingface = classmethod(lambda cls, path=None, split=None: cls(samples=[
        drop.DropSample(**json.loads(line)) for line in (data / "drop_validation.jsonl").read_text(encoding="utf-8").splitlines()]))
    # MMLU's subject table feeds only its printed per-category averages (each needs a subject): the local subjects
    if (data / "mmlu").is_dir():
        local = {p.name[:-len("_test.csv")]: ["other"] for p in (data / "mmlu" / "test").glob("*_test.csv")}
        mmlu.get_subcategories = lambda: local
        mmlu.get_categories = lambda: {"other (business, health, misc.)": ["other"]}

    kwargs = dict(model_name="causal", model_path=config["model"], device="cpu")
    out: dict = {"threads": torch.get_num_threads(), "benchmarks": {}}
    os.chdir(data)  # CRASS reads ./CRASS_FTM_main_data_set.csv, HHH ./data/<category>/task.json
    for name in config["benchmarks"]:
        record.clear()
        t0 = time.perf_counter()
        if name == "mmlu":
            score = float(mmlu.main(data_dir=str(data / "mmlu"), ntrain=5, **kwargs))
        elif name == "bbh":
            score = float(bbh.main(ntrain=3, **kwargs))
        elif name == "drop":
            score = float(drop.main(ntrain=3, **kwargs))
        elif name == "crass":
            score = float(crass.main(ntrain=3, **kwargs))
        else:
            runs, evaluate = [], hhh.evaluate
            for slot in (0, 1):
                answers: dict[str, list] = {}
                first = len(record)

                def observed_evaluate(model, data_, **kw):
                    score_, ans = evaluate(model, data_, **kw)
                    answers[str(len(answers))] = [bool(c) for _, c in ans]
                    return score_, ans

                hhh.evaluate = observed_evaluate
                hhh.random = types.SimpleNamespace(randint=lambda a, b, s=slot: s)  # hhh.py's `random.randint(0, 1)`
                scores = hhh.main(**kwargs)[0]
                runs.append({"slot": "AB"[slot], "scores": scores,
                             "correct": {c: answers[str(i)] for i, c in enumerate(HHH_CATEGORIES)},
                             "calls": record[first:]})
            hhh.evaluate = evaluate
            out["benchmarks"][name] = {"runs": runs, "seconds": time.perf_counter() - t0}
            print(f"instructeval {name}: {runs[0]['scores']} / {runs[1]['scores']} "
                  f"({time.perf_counter() - t0:.1f}s)", file=sys.stderr, flush=True)
            continue
        out["benchmarks"][name] = {"score": score, "calls": list(record), "seconds": time.perf_counter() - t0}
        print(f"instructeval {name}: {score:.4f} over {len(record)} calls ({time.perf_counter() - t0:.1f}s)",
              file=sys.stderr, flush=True)
    Path(config["out"]).write_text(json.dumps(out), encoding="utf-8")


def run_instruct_eval(checkout: Path, data: Path, model: str, names: list[str], threads: int, out: Path) -> dict:
    config = {"checkout": str(checkout), "data": str(data), "model": model, "benchmarks": names,
              "threads": threads, "out": str(out)}
    log = out.with_suffix(".log")
    with open(log, "w") as f:
        proc = subprocess.run([sys.executable, "-m", "benchmarks.instructeval_agreement", "--ie-child",
                               json.dumps(config)], cwd=ROOT, env=child_env(PYTHONPATH=str(ROOT)), stdout=f,
                              stderr=subprocess.STDOUT)
    if proc.returncode != 0 or not out.is_file():
        tail = [line for line in log.read_text(errors="replace").splitlines() if line.strip()][-5:]
        sys.exit("error: InstructEval's run failed: " + " | ".join(tail))
    return json.loads(out.read_text(encoding="utf-8"))


# ------------------------------------------------------------------------------------------ our side
def run_ours(model_dir: str, paths: dict[str, str], batch_size: int) -> tuple[dict, object]:
    """{name: BenchmarkRun} from our runner, and the runner (for the HHH diagnosis)."""
    from flacuna_jax.evals import load_benchmark
    from flacuna_jax.evals.benchmark import Options
    from flacuna_jax.evals.runner import Runner, stop_ids
    from flacuna_jax.inference import load_for_inference
    from flacuna_jax.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    model, params = load_for_inference(model_dir, layers="unrolled")  # as the eval CLI loads it
    runner = Runner(model, params, tokenizer, batch_size, eos_ids=stop_ids(model_dir, model, tokenizer))
    runs = {}
    for name, path in paths.items():
        runs[name] = runner.run(load_benchmark(name, path, Options()))
        print(f"ours {name}: {runs[name].result.score:.4f} over {runs[name].result.n} examples "
              f"({runs[name].seconds:.1f}s)", file=sys.stderr, flush=True)
    return runs, runner


# ------------------------------------------------------------------------------------------ comparison
def compare_generation(ie: dict, ours) -> dict:
    calls, scored = ie["calls"], ours.scored
    pairs = list(zip(calls, scored))
    diffs = [{"task": s.example.task, "id": s.example.id, "prompt_tail": c["prompt"][-80:], "ie_output": c["output"],
              "ours_output": s.output, "same_prompt": c["prompt"] == s.example.prompt}
             for c, s in pairs if c["output"] != s.output or c["prompt"] != s.example.prompt]
    return {
        "examples_ie": len(calls), "examples_ours": len(scored),
        "same_prompt": sum(c["prompt"] == s.example.prompt for c, s in pairs),
        "same_output": sum(c["output"] == s.output for c, s in pairs),
        "same_label": sum(c.get("label") == s.example.label for c, s in pairs),
        "same_correct": sum(c.get("correct") == bool(s.correct) for c, s in pairs),
        "score_ie": ie["score"], "score_ours": ours.result.score,
        "seconds_ie": round(ie["seconds"], 1), "seconds_ours": round(ours.seconds, 1),
        "diffs": diffs,
    }


def compare_hhh(ie: dict, ours) -> dict:
    run_a, run_b = ie["runs"]
    scored = ours.scored
    n = len(scored)
    per_slot = []
    for run in (run_a, run_b):
        bases, prompts = run["calls"][0::2], run["calls"][1::2]
        correct = [c for cat in HHH_CATEGORIES for c in run["correct"][cat]]
        per_slot.append((bases, prompts, correct))
    (base_a, prompt_a, correct_a), (base_b, prompt_b, correct_b) = per_slot
    same_prompt = same_a = same_b = same_correct = 0
    diffs = []
    for i, s in enumerate(scored if len(prompt_a) == len(prompt_b) == n else []):
        slot_b_prompt, base_prompt = s.example.extra_prompts
        same_prompt += (prompt_a[i]["prompt"] == s.example.prompt and prompt_b[i]["prompt"] == slot_b_prompt
                        and base_a[i]["prompt"] == base_b[i]["prompt"] == base_prompt)
        ie_pred_a, ie_pred_b = "A" if correct_a[i] else "B", "B" if correct_b[i] else "A"
        ours_pred_b = s.detail["pred_chosen_in_b"]
        same_a += ie_pred_a == s.output
        same_b += ie_pred_b == ours_pred_b
        ie_correct = (correct_a[i] + correct_b[i]) / 2
        same_correct += ie_correct == s.correct
        if ie_pred_a != s.output or ie_pred_b != ours_pred_b:
            (a0, b0), (a1, b1), (a2, b2) = base_a[i]["logits"], prompt_a[i]["logits"], prompt_b[i]["logits"]
            diffs.append({"task": s.example.task, "id": s.example.id, "ie_preds": ie_pred_a + ie_pred_b,
                          "ours_preds": s.output + ours_pred_b,
                          "ie_margin_chosen_in_a": (a1 - a0) - (b1 - b0), "ie_margin_chosen_in_b": (a2 - a0) - (b2 - b0),
                          "_prompts": (s.example.prompt, slot_b_prompt, base_prompt)})
    ie_scores = {c: (run_a["scores"][c] + run_b["scores"][c]) / 2 for c in HHH_CATEGORIES}
    return {
        "examples_ie": len(prompt_a), "examples_ours": n, "same_prompt": same_prompt,
        "same_pred_chosen_in_a": same_a, "same_pred_chosen_in_b": same_b, "same_correct": same_correct,
        "score_ie": {**ie_scores, "mean": sum(ie_scores.values()) / 4},
        "score_ours": {**{c: ours.result.tasks[c].score for c in HHH_CATEGORIES}, "mean": ours.result.score},
        # IE rounds each run's category score to 4 places; ours is the exact mean of the two orders
        "scores_within_rounding": all(abs(ours.result.tasks[c].score - ie_scores[c]) <= 1e-4 + 1e-12
                                      for c in HHH_CATEGORIES),
        "seconds_ie": round(ie["seconds"], 1), "seconds_ours": round(ours.seconds, 1), "diffs": diffs,
    }


def diagnose_generation(model_dir: str, diffs: list[dict], prompts: dict, max_new: int, threads: int) -> None:
    """Adds, per output difference, transformers' top-1 minus top-2 logit at the first diverging token."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    for d in diffs:
        if not d["same_prompt"]:
            continue
        inputs = tok(prompts[(d["task"], d["id"])], return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=max_new, do_sample=False, pad_token_id=tok.eos_token_id,
                                 output_scores=True, return_dict_in_generate=True)
        new = out.sequences[0, inputs.input_ids.shape[1]:].tolist()
        step = next((k for k in range(len(new)) if not d["ours_output"].startswith(
            tok.decode(new[:k + 1], skip_special_tokens=True))), len(new) - 1)
        top2 = torch.topk(out.scores[step][0].float(), 2)
        d.update(diverge_step=step, top2_margin=float(top2.values[0] - top2.values[1]),
                 top2_tokens=[tok.decode([int(t)]) for t in top2.indices])


def diagnose_hhh(runner, diffs: list[dict]) -> None:
    """Adds our margins (A - A_base) - (B - B_base) in both slot orders."""
    for d in diffs:
        (a1, b1), (a2, b2), (a0, b0) = runner.next_token_logits(list(d.pop("_prompts")), ("A", "B"))
        d.update(ours_margin_chosen_in_a=(a1 - a0) - (b1 - b0), ours_margin_chosen_in_b=(a2 - a0) - (b2 - b0))


def crass_bigbench_prompts(data: Path, ours) -> dict:
    """Our crass_ai task.json reader against the CSV written from it (no model call): same prompts?"""
    from flacuna_jax.evals import load_benchmark
    from flacuna_jax.evals.benchmark import Options

    fits = lambda p: True  # noqa: E731  (CRASS prompts are far below 2048 tokens; the CSV run kept all 3 shots)
    from_json = load_benchmark("crass", str(data / "crass_ai_task.json"), Options()).examples(fits)
    differ = [e.id for e, s in zip(from_json, ours.scored) if e.prompt != s.example.prompt]
    return {"same_prompt": len(from_json) - len(differ), "of": len(from_json), "differ_ids": differ}


# ------------------------------------------------------------------------------------------ main
def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--ie-child"]:
        ie_child(json.loads(argv[1]))
        return {}
    p = argparse.ArgumentParser(prog="python -m benchmarks.instructeval_agreement", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--instruct-eval", help=f"checkout of declare-lab/instruct-eval at {IE_COMMIT} "
                                           f"(default: extracted from {IE_MIRROR})")
    p.add_argument("--bigbench", help=f"BIG-bench's benchmark_tasks dir (default: {BB_DEFAULT}, else the PyPI sdist)")
    p.add_argument("--model", help="HF LLaMA dir (default: SmolLM2-135M-Instruct, built by benchmarks/smollm2.py)")
    p.add_argument("--mmlu", type=int, default=40, help="MMLU-layout test questions (0: skip)")
    p.add_argument("--bbh", type=int, default=30, help="BBH-layout scored examples (0: skip)")
    p.add_argument("--drop", type=int, default=30, help="DROP-layout scored rows (0: skip)")
    p.add_argument("--crass", type=crass_size, default=None,
                   help="CRASS questions (>= 3: its data check prints 3 random ones) or all (default)")
    p.add_argument("--hhh", type=lambda t: 0 if t == "0" else size(t), default=None,
                   help="HHH examples per category or all (default)")
    p.add_argument("--threads", type=int, default=1, help="torch threads for InstructEval's side")
    p.add_argument("--batch-size", type=int, default=8, help="our runner's batch size")
    p.add_argument("--keep", help="write the data and both sides' records here (default: a temporary dir)")
    a = p.parse_args(argv)
    if a.model is None:
        from benchmarks.smollm2 import smollm2_dir

        a.model = str(smollm2_dir())
    sizes = {"mmlu": a.mmlu, "bbh": a.bbh, "drop": a.drop, "crass": a.crass, "hhh": a.hhh}

    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="ie_agree_")))
        work = Path(a.keep) if a.keep else tmp
        work.mkdir(parents=True, exist_ok=True)
        checkout, commit = instruct_eval_dir(a.instruct_eval, tmp)
        bb = bigbench_dir(a.bigbench, tmp)
        data = work / "data"
        if data.exists():
            shutil.rmtree(data)
        data.mkdir()
        written = write_data(bb, data, sizes)
        paths = written["paths"]
        names = list(paths)

        t0 = time.perf_counter()
        ie = run_instruct_eval(checkout, data, a.model, names, a.threads, work / "instructeval.json")["benchmarks"]
        ie_s = time.perf_counter() - t0

        import jax

        t0 = time.perf_counter()
        ours, runner = run_ours(a.model, paths, a.batch_size)
        ours_s = time.perf_counter() - t0
        with open(work / "ours.jsonl", "w", encoding="utf-8") as f:
            for name, run in ours.items():
                for s in run.scored:
                    f.write(json.dumps({"benchmark": name, "task": s.example.task, "id": s.example.id,
                                        "prompt": s.example.prompt, "extra_prompts": list(s.example.extra_prompts),
                                        "output": s.output, "label": s.example.label, "correct": s.correct,
                                        "detail": dict(s.detail)}) + "\n")

        result: dict = {"benchmark": "instructeval_agreement", "model": a.model, "instruct_eval_commit": commit,
                        "bigbench": str(bb), "sizes": {k: ("all" if v is None else v) for k, v in sizes.items()},
                        "threads_ie": a.threads, "batch_size_ours": a.batch_size,
                        "device_ours": jax.devices()[0].device_kind, **written["notes"]}
        for name in names:
            if name == "hhh":
                r = compare_hhh(ie[name], ours[name])
                if r["diffs"]:
                    diagnose_hhh(runner, r["diffs"])
                full = r["same_prompt"] == r["same_correct"] == r["same_pred_chosen_in_a"] == r["same_pred_chosen_in_b"] \
                    == r["examples_ie"] == r["examples_ours"] and r["scores_within_rounding"]
            else:
                r = compare_generation(ie[name], ours[name])
                if r["diffs"]:
                    prompts = {(s.example.task, s.example.id): s.example.prompt for s in ours[name].scored}
                    diagnose_generation(a.model, r["diffs"], prompts, load_request(name).max_new_tokens, a.threads)
                full = r["same_prompt"] == r["same_output"] == r["same_label"] == r["same_correct"] \
                    == r["examples_ie"] == r["examples_ours"] and abs(r["score_ie"] - r["score_ours"]) < 1e-12
            r["agree"] = bool(full)
            r["diffs"] = r["diffs"][:5]
            result[name] = r
        if "crass" in names:
            result["crass"]["bigbench_json_reader"] = crass_bigbench_prompts(data, ours["crass"])
        result.update(seconds_ie=round(ie_s, 1), seconds_ours=round(ours_s, 1),
                      agree=all(result[n]["agree"] for n in names))
        if a.keep:
            (work / "result.json").write_text(json.dumps(result, indent=1), encoding="utf-8")
        return emit(result)


def load_request(name: str):
    import importlib

    return importlib.import_module(f"flacuna_jax.evals.{name}").REQUEST


if __name__ == "__main__":
    main()
