"""Evaluate as the Flacuna paper does: InstructEval's protocol on the benchmarks' published files.

    python -m flacuna_jax.eval --model HF_DIR [--adapter PEFT_DIR | --run RUN_DIR] \\
        --benchmark mmlu=data/mmlu --benchmark bbh=BIG-Bench-Hard/bbh --benchmark drop=drop_dataset_dev.json \\
        --benchmark crass=CRASS_FTM_main_data_set.csv --benchmark humaneval=HumanEval.jsonl.gz \\
        --benchmark hhh=bigbench/benchmark_tasks/hhh_alignment \\
        [--benchmark impact=data.jsonl --judge-url URL --judge-model NAME [--judge-api-key-env VAR]
         [--impact-prompt instructeval|flacuna]] \\
        [--protocol instructeval|loglik] [--shots K] [--max-examples N] [--batch-size B] \\
        --out results.json [--predictions preds.jsonl] [--temperature 0.1 --samples N] [--dtype bfloat16]

--protocol instructeval (the default) is InstructEval's procedure at commit e2eb966 (July 2023, the
paper's): the raw prompt (no chat template; BOS only if the tokenizer adds one), its shots (MMLU 5 dev
rows, BBH the first 3 examples, DROP 3 seeded draws, CRASS the paper's 3, HumanEval and HHH none),
dropped from the end while the prompt is longer than 2048 tokens, greedy decoding of its max new
tokens (MMLU 2, BBH 32, DROP 8, CRASS 8, HumanEval 512), correct when
`output.strip().startswith(label)`, and its aggregates: MMLU the mean over all questions, BBH the
mean over tasks, HHH per category and their mean. Each benchmark's reader and prompts are documented
in its module, flacuna_jax/evals/<name>.py. Generation is batched through the KV-cache decoder.

--shots K overrides every benchmark's shots (the paper's Table 3 is 0-shot). --max-examples N scores
the first N examples of every task, in file order. results.json holds {"benchmarks": {NAME: {"score",
"n", "tasks": {TASK: {"score", "n"}}}}}; --predictions writes one line per scored example,
{"benchmark", "task", "id", "prompt", "output", "label", "correct"}. Tables in the layout of the
paper's Table 2 (Table 3 with --shots 0), Table 4 for HHH and Table 5 for IMPACT are printed with the
paper's VICUNA-13B and FLACUNA-13B rows, as the paper's text prints them (flacuna_jax/evals/report.py).

--benchmark impact=data.jsonl is the paper's writing evaluation (Table 5; flacuna_jax/evals/impact.py):
each answer (InstructEval's raw "Definition Prompt", or --impact-prompt flacuna, the paper's section
3.4 template; up to 1024 new tokens) is reviewed twice by a chat model at temperature 0, relevance and
coherence on InstructEval's 1-5 rubrics, through any OpenAI-compatible endpoint: --judge-url
https://api.openai.com/v1 --judge-model gpt-3.5-turbo --judge-api-key-env OPENAI_API_KEY for the
paper's ChatGPT setting, or a local server (`python -m flacuna_jax.serve`, vLLM, `transformers serve`).
At most --judge-concurrency requests are in flight; each is retried --judge-retries times (backoff)
on timeouts, 429 and 5xx. Every review is appended to --judge-cache as it arrives; a run whose judge
failed ends with a one-line error (results and predictions of everything else are written) and the
same command asks the judge only for the missing reviews.

--protocol loglik keeps the log-likelihood scoring (flacuna_jax/evals/loglik.py; training's
`eval.tasks` uses the same code). --task STYLE=FILE (our own multiple-choice JSONL) is always scored
that way; --heldout FILE adds the held-out loss and perplexity of FLAN-Mini records.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from flacuna_jax.evals import BENCHMARKS, load_benchmark
from flacuna_jax.evals.benchmark import Options
from flacuna_jax.evals.impact import PROMPT_STYLES
from flacuna_jax.evals.loglik import STYLES, EvalInputError, EvalSuite, parse_task
from flacuna_jax.inference import add_model_args, load_from_args

PROTOCOLS = ("instructeval", "loglik")


def parse_benchmark(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or name not in BENCHMARKS or not path:
        raise EvalInputError(f"--benchmark {text!r}: expected NAME=PATH with NAME one of {', '.join(BENCHMARKS)}")
    return name, path


def format_metrics(metrics: dict[str, float]) -> str:
    rows = [("metric", "value")] + [(k, f"{v:.4f}" if isinstance(v, float) else str(v)) for k, v in metrics.items()]
    width = max(len(r[0]) for r in rows)
    lines = [f"{a:<{width}}  {b:>12}" for a, b in rows]
    lines.insert(1, "-" * (width + 14))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m flacuna_jax.eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--benchmark", action="append", default=[], metavar="NAME=PATH",
                   help="a benchmark's published file(s), NAME in " + "|".join(BENCHMARKS))
    p.add_argument("--protocol", choices=PROTOCOLS, default="instructeval",
                   help="instructeval: generate and check the prefix (default); loglik: letters by log-likelihood")
    p.add_argument("--task", action="append", default=[], metavar="STYLE=FILE",
                   help="our multiple-choice JSONL, scored by log-likelihood, STYLE in " + "|".join(STYLES))
    p.add_argument("--shots", "--k", dest="shots", type=int, help="shots per prompt (default: InstructEval's)")
    p.add_argument("--max-examples", type=int, help="score the first N examples of every task / held-out file")
    p.add_argument("--batch-size", type=int, default=8, help="prompts decoded (or scored) together")
    p.add_argument("--out", help="results JSON (needed with --benchmark)")
    p.add_argument("--predictions", help="per-example JSONL")
    p.add_argument("--heldout", help="FLAN-Mini-format file for held-out loss and perplexity")
    p.add_argument("--temperature", type=float, default=0.0, help="HumanEval sampling temperature (0 = greedy)")
    p.add_argument("--samples", type=int, default=1, help="HumanEval completions per problem (pass@k)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--name", help="the model's row name in the tables (default: the --run/--adapter/--model dir name)")
    j = p.add_argument_group("the judge of --benchmark impact (any OpenAI-compatible chat endpoint)")
    j.add_argument("--judge-url", help="API base, e.g. https://api.openai.com/v1 or http://127.0.0.1:8000/v1 "
                                       "(a URL without a path gets /v1)")
    j.add_argument("--judge-model", help="the judge's model name at that endpoint (the paper: ChatGPT)")
    j.add_argument("--judge-api-key-env", metavar="VAR",
                   help="environment variable holding the API key (none is sent otherwise)")
    j.add_argument("--judge-concurrency", type=int, default=8, help="requests in flight (default 8)")
    j.add_argument("--judge-timeout", type=float, default=60.0, help="seconds per request (default 60, InstructEval's)")
    j.add_argument("--judge-retries", type=int, default=4,
                   help="retries of a request after a timeout, 429 or 5xx (default 4)")
    j.add_argument("--judge-max-tokens", type=int, help="reply token limit (default: none, as InstructEval)")
    j.add_argument("--judge-cache", help="JSONL cache of the reviews (default: judge_cache.jsonl beside --out)")
    j.add_argument("--impact-prompt", choices=PROMPT_STYLES, default="instructeval",
                   help="instructeval: Definition + ' ' + Prompt, raw (default); "
                        "flacuna: the paper's section 3.4 template")
    return p


def _check_args(a: argparse.Namespace) -> None:
    if not a.benchmark and not a.task and not a.heldout:
        sys.exit("error: nothing to evaluate (give --benchmark, --task and/or --heldout)")
    if a.benchmark and a.protocol != "instructeval":
        sys.exit("error: --benchmark files are scored with --protocol instructeval; --protocol loglik scores "
                 "--task JSONL files")
    if a.benchmark and not a.out:
        sys.exit("error: --benchmark needs --out results.json")
    if (a.shots is not None and a.shots < 0) or (a.max_examples is not None and a.max_examples < 1) \
            or a.batch_size < 1 or a.samples < 1 or a.temperature < 0:
        sys.exit("error: need --shots >= 0, --max-examples >= 1, --batch-size >= 1, --samples >= 1, --temperature >= 0")
    if any(b.partition("=")[0] == "impact" for b in a.benchmark):
        if not a.judge_url or not a.judge_model:
            sys.exit("error: --benchmark impact needs a judge: --judge-url URL --judge-model NAME")
        if a.judge_api_key_env and not os.environ.get(a.judge_api_key_env):
            sys.exit(f"error: --judge-api-key-env {a.judge_api_key_env}: that environment variable is not set")


def make_judge(a: argparse.Namespace):
    """The IMPACT judge from the --judge-* arguments, checked reachable before anything is generated."""
    from flacuna_jax.evals.judge import ChatJudge

    cache = a.judge_cache or str(Path(a.out).parent / "judge_cache.jsonl")
    judge = ChatJudge(a.judge_url, a.judge_model, os.environ.get(a.judge_api_key_env) if a.judge_api_key_env else None,
                      concurrency=a.judge_concurrency, timeout_s=a.judge_timeout, retries=a.judge_retries,
                      max_tokens=a.judge_max_tokens, cache_path=cache)
    judge.check()
    return judge


def main(argv: list[str] | None = None) -> dict:
    """Runs the evaluation; returns {"benchmarks": {...}, "metrics": {...}} (what results.json holds)."""
    from flacuna_jax.evals import report
    from flacuna_jax.evals.impact import IncompleteReviews
    from flacuna_jax.evals.runner import Runner, stop_ids
    from flacuna_jax.tokenizer import load_tokenizer

    a = build_parser().parse_args(argv)
    _check_args(a)
    options = Options(a.shots, a.max_examples, a.temperature, a.samples, a.seed)
    try:
        specs = [parse_benchmark(b) for b in a.benchmark]
        judge = make_judge(a) if any(name == "impact" for name, _ in specs) else None
        benches = [load_benchmark(name, path, options, **({"judge": judge, "prompt_style": a.impact_prompt}
                                                           if name == "impact" else {})) for name, path in specs]
        tasks = [parse_task(t) for t in a.task]
        tokenizer = load_tokenizer(a.tokenizer or a.model)
        model, params = load_from_args(a)
        suite = EvalSuite(model, tokenizer, tasks, a.heldout, a.shots, a.batch_size, a.max_examples) \
            if tasks or a.heldout else None
    except (ValueError, OSError, ImportError) as e:
        sys.exit(f"error: {e}")

    results, scored, more, failed = {}, {}, {}, []
    if benches:
        runner = Runner(model, params, tokenizer, a.batch_size, a.seed, eos_ids=stop_ids(a.model, model, tokenizer))
        for bench in benches:
            try:
                run = runner.run(bench)
            except IncompleteReviews as e:  # the judge failed: keep the answers, report at the end
                scored[bench.name] = e.scored
                failed.append(f"{bench.name}: {e}")
                continue
            except ValueError as e:
                sys.exit(f"error: {bench.name}: {e}")
            results[bench.name], scored[bench.name] = run.result, run.scored
            if bench.name == "humaneval":
                from flacuna_jax.evals.humaneval import pass_at_ks

                more["humaneval"] = pass_at_ks(run.scored)  # pass@1 (= score), and @10, @100 with enough samples
            if hasattr(bench, "summary"):
                more[bench.name] = bench.summary(run.scored)
            value = (f"Rel. {more['impact']['relevance']:.2f} Coh. {more['impact']['coherence']:.2f} (1-5)"
                     if bench.name == "impact" else f"{100 * run.result.score:.2f}")
            print(f"{bench.name}: {value} over {run.result.n} examples "
                  f"({run.seconds:.1f}s, {run.result.n / max(run.seconds, 1e-9):.2f} ex/s)", file=sys.stderr)
    metrics = suite(params) if suite is not None else {}
    out = {"benchmarks": report.results_dict(results, more), "metrics": metrics}
    name = a.name or Path(a.run or a.adapter or a.model).name
    if results:
        print(report.format_tables(results, name, a.shots, more))
    if metrics:
        print(format_metrics(metrics))
    settings = {"model": a.model, "adapter": a.adapter, "run": a.run, "protocol": a.protocol, "shots": a.shots,
                "max_examples": a.max_examples, "temperature": a.temperature, "samples": a.samples}
    if judge is not None:
        settings.update(impact_prompt=a.impact_prompt, judge_url=judge.base_url, judge_model=judge.model)
    if a.out:
        report.write_results(a.out, out["benchmarks"], {"metrics": metrics, "settings": settings,
                                                        **({"incomplete": failed} if failed else {})})
    if a.predictions:
        report.write_predictions(a.predictions, scored)
    if failed:
        sys.exit("error: " + "; ".join(failed))
    return out


if __name__ == "__main__":
    main()
