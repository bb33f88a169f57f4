"""Golden records of InstructEval's own code (declare-lab/instruct-eval at e2eb966) on fixed inputs, with no model.

    python -m benchmarks.instructeval_golden [--instruct-eval DIR]

Writes tests/data/instructeval_e2eb966/golden.json, which tests/test_instructeval_agreement.py holds
our evaluation to. Run it once per change of the inputs (tests/data/instructeval_e2eb966/inputs/:
small files in each benchmark's published layout, with the quirks worth pinning: pandas' numbers and
"None" in MMLU CSVs, quoted commas and newlines, DROP rows with repeated or differing spans and shared
passages, CRASS lines with 3 or 4 options and stray spaces, an HHH example listing the chosen answer
second, HumanEval completions with odd indents and trailing code).

InstructEval's `main` of mmlu, bbh, drop, crass and hhh, and `human_eval.main.evaluate` (which executes
the programs with its own `check_correctness`), run unchanged on a copy of the inputs, with a scripted
`EvalModel` in place of a model:

- `count_text_length(text)` = the number of whitespace-separated words, with the `max_input_length`
  of MAX_INPUT_WORDS (small, so that long prompts lose shots as they would past 2048 tokens);
- `run(prompt)` returns the benchmark's OUTPUTS in turn (answers with spaces, newlines, lower case,
  nothing: InstructEval's `strip().startswith(label)` decides), recording the label and verdict
  InstructEval computes (the `Observed` string notes each `startswith`);
- `get_choice(prompt)` (HHH) returns logits fixed by a hash of the prompt; HHH's unseeded slot draw
  is forced to A for one run and to B for a second, as benchmarks/instructeval_agreement.py does.

The only adaptations besides: the import-level stubs of `benchmarks.instructeval_agreement.import_
instruct_eval`, BBH's and DROP's hub loaders reading the local files, and MMLU's subject table given
the local subjects (it feeds only its printed per-category averages, which need all 57 subjects).
The checkout comes from --instruct-eval, else the git mirror that `fetch github:declare-lab/instruct-eval`
leaves at /work/.mirror/declare-lab+instruct-eval/repo.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from benchmarks.common import ROOT
from benchmarks.instructeval_agreement import IE_COMMIT, Observed, import_instruct_eval, instruct_eval_dir

GOLDEN_DIR = ROOT / "tests" / "data" / "instructeval_e2eb966"
MAX_INPUT_WORDS = {"mmlu": 130, "bbh": 110, "drop": 90, "crass": 120}
OUTPUTS = {
    "mmlu": [" B", "A\n", "\nB is right", "b", "", "A.", " C", "B", "D", "(B)", "A"],
    "bbh": ["True", "true", " False\n", "\n(B)\n", "(A) 04/26/1969", "Answer: (A)"],
    "drop": ["17", " 5,500 people", "June", "four hundred and ten", "28 ships", "Ben", "\n250", "300", "4500"],
    "crass": ["B", " A", "C.", "\nA", "b", "A"],
    "humaneval": [
        "    return a + b\n\n\ndef unused():\n    raise SystemExit(1)\n",  # code after the first blank line is cut
        "   return n % 2 == 0\n   # three spaces: fix_indents pads to four\n",
        "\n\n    return s[::-1]",  # leading newlines stripped
        "    return x + x\n",  # wrong
    ],
}


def hhh_logits(prompt: str) -> list[float]:
    """Fixed "A" and "B" next-token logits of a prompt (two decimals: exact in JSON and in float sums)."""
    digest = hashlib.sha256(prompt.encode("utf-8")).digest()
    return [round(digest[0] / 16 - 8, 2), round(digest[1] / 16 - 8, 2)]


def run_instruct_eval(checkout: Path, inputs: Path) -> dict:
    ie = import_instruct_eval(checkout)
    calls: list[dict] = []
    script: list[str] = []

    class Scripted(ie.modeling.EvalModel):
        def run(self, prompt: str, **kwargs) -> str:
            out = Observed(script[len(calls) % len(script)])
            out.entry = {"prompt": prompt, "output": str(out)}
            calls.append(out.entry)
            return out

        def count_text_length(self, text: str) -> int:
            return len(text.split())

        def get_choice(self, prompt: str, **kwargs):
            calls.append({"prompt": prompt})
            return tuple(hhh_logits(prompt))

    def model_for(name):
        def select_model(max_input_length, max_output_length, **kwargs):
            del max_input_length  # InstructEval's 2048 (1024, 1360): the scripted model counts words instead
            return Scripted(model_path="scripted", max_input_length=MAX_INPUT_WORDS.get(name, 10 ** 6),
                            max_output_length=max_output_length)
        return select_model

    bbh, drop, mmlu, hhh = ie.bbh, ie.drop, ie.mmlu, ie.hhh
    bbh.BBHData.get_config_names = classmethod(lambda cls, path=None: sorted(p.stem for p in (inputs / "bbh").glob("*.json")))
    bbh.BBHData.load_from_huggingface = classmethod(lambda cls, path=None, config="", split="test": cls(samples=[
        bbh.BBHSample(**x) for x in json.loads((inputs / "bbh" / f"{config}.json").read_text(encoding="utf-8"))["examples"]]))
    drop.DropData.load_from_huggingface = classmethod(lambda cls, path=None, split=None: cls(samples=[
        drop.DropSample(**json.loads(line)) for line in (inputs / "drop_validation.jsonl").read_text(encoding="utf-8").splitlines()]))
    local = {p.name[:-len("_test.csv")]: ["other"] for p in (inputs / "mmlu" / "test").glob("*_test.csv")}
    mmlu.get_subcategories = lambda: local
    mmlu.get_categories = lambda: {"other (business, health, misc.)": ["other"]}

    golden: dict = {}
    kwargs = dict(model_name="scripted")
    for name, module, call in (("mmlu", mmlu, lambda: mmlu.main(data_dir=str(inputs / "mmlu"), ntrain=5, **kwargs)),
                               ("bbh", bbh, lambda: bbh.main(ntrain=3, **kwargs)),
                               ("drop", drop, lambda: drop.main(ntrain=3, **kwargs)),
                               ("crass", ie.crass, lambda: ie.crass.main(ntrain=3, **kwargs))):
        module.select_model = model_for(name)
        calls.clear()
        script[:] = OUTPUTS[name]
        score = float(call())
        golden[name] = {"max_input_words": MAX_INPUT_WORDS[name], "score": score, "calls": list(calls)}

    hhh.select_model = model_for("hhh")
    runs, prompts = [], {}
    evaluate = hhh.evaluate
    for slot in (0, 1):
        answers: list[list[bool]] = []

        def observed_evaluate(model, data, **kw):
            score, ans = evaluate(model, data, **kw)
            answers.append([bool(c) for _, c in ans])
            return score, ans

        hhh.evaluate = observed_evaluate
        hhh.random = type("FixedSlot", (), {"randint": staticmethod(lambda a, b, s=slot: s)})
        calls.clear()
        scores = hhh.main(**kwargs)[0]
        for c in calls:
            prompts.setdefault(c["prompt"], len(prompts))
        runs.append({"slot": "AB"[slot], "scores": scores,
                     "correct": dict(zip(("harmless", "honest", "helpful", "other"), answers)),
                     "calls": [prompts[c["prompt"]] for c in calls]})  # (base, prompt) per example, as indices
    hhh.evaluate = evaluate
    golden["hhh"] = {"runs": runs, "prompts": [[text, *hhh_logits(text)] for text in prompts]}

    from human_eval import main as humaneval_main

    humaneval_main.select_model = model_for("humaneval")
    calls.clear()
    script[:] = OUTPUTS["humaneval"]
    result = humaneval_main.main(data_path=str(inputs / "HumanEval.jsonl"), **kwargs)
    [results_file] = Path.cwd().glob("humaneval_*_predictions.jsonl_results.jsonl")
    executed = [json.loads(line) for line in results_file.read_text().splitlines()]
    golden["humaneval"] = {"pass@1": float(result), "calls": [
        {"prompt": c["prompt"], "output": c["output"], "task_id": e["task_id"], "completion": e["completion"],
         "passed": e["passed"], "result": e["result"]} for c, e in zip(calls, executed)]}
    return golden


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.instructeval_golden", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--instruct-eval", help=f"checkout of declare-lab/instruct-eval at {IE_COMMIT}")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        checkout, commit = instruct_eval_dir(args.instruct_eval, Path(tmp))
        work = Path(tmp) / "inputs"
        shutil.copytree(GOLDEN_DIR / "inputs", work)
        os.chdir(work)  # CRASS reads ./CRASS_FTM_main_data_set.csv, HHH ./data/<category>/task.json
        golden = {"instruct_eval_commit": commit, "regenerate": "python -m benchmarks.instructeval_golden",
                  "length_rule": "whitespace-separated words", "benchmarks": run_instruct_eval(checkout, work)}
    out = GOLDEN_DIR / "golden.json"
    out.write_text(json.dumps(golden, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {out} ({out.stat().st_size} bytes) from InstructEval {commit}", file=sys.stderr)


if __name__ == "__main__":
    main()
