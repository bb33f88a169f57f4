"""`--protocol loglik`: multiple choice by log-likelihood over our JSONL, held-out loss and perplexity.

    python -m flacuna_jax.eval --model HF_DIR [--adapter PEFT_DIR | --run RUN_DIR] --protocol loglik \\
        [--task mmlu=mmlu_anatomy.jsonl --task bbh=bbh_navigate.jsonl ...] [--shots 5] \\
        [--heldout flan_mini_eval.jsonl] [--out results.json] [--dtype float32]

Multiple choice. Each JSONL line is {"question": str, "choices": [str], "answer": int | "A".."Z"},
optionally "subject" (MMLU header) and "shot": true (a k-shot example, never scored; without any,
the first k lines are the shots, as InstructEval's BBH takes them). Prompts are built as
declare-lab/instruct-eval builds them, per style:

    mmlu   "The following are multiple choice questions (with answers) about {subject}.\\n\\n"
           + shots "{q}\\nA. {c0}\\nB. {c1}...\\nAnswer: {letter}\\n\\n" + "{q}\\nA. ...\\nAnswer:"
           (InstructEval's header: " ".join-with-leading-space subject, hence two spaces after "about")
    crass  the same without the header; InstructEval's 3 paper shots when the file has none
    bbh    shots "{q}\\nAnswer: {target}\\n\\n" + "{q}\\nAnswer:"; the choices are the answer texts
    hhh    InstructEval's paper-era A/B template (`evals.hhh.TEMPLATE`, no shots), calibrated as it does: the score of
           each letter minus its score on the same template with both options set to the rejected one

The prediction is the choice whose continuation (" A", " B"... or " {text}" for bbh) has the highest
log-likelihood, computed by `score.score_requests`; shots are dropped one by one while the prompt is
longer than the model's context, as InstructEval does. InstructEval itself decodes a few tokens
and checks the prefix for LLaMA models; scoring the letters instead is the log-likelihood version.

Held-out loss: FLAN-Mini records (any format `data.sources` reads) encoded with the training
template and its assistant-only mask; loss = mean NLL over the trained tokens; perplexity = exp(loss).

In-training evaluation: build an `EvalSuite` once (tokenization and shots happen there), then call
`suite(params)` for a flat dict of metrics.
"""

from __future__ import annotations

import dataclasses
import math
import string
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from flacuna_jax.evals import hhh
from flacuna_jax.jsonl import read_objects
from flacuna_jax.score import score_requests

STYLES = ("mmlu", "bbh", "crass", "hhh")
DEFAULT_SHOTS = {"mmlu": 5, "bbh": 3, "crass": 3, "hhh": 0}  # InstructEval's ntrain per task
LETTERS = string.ascii_uppercase


class EvalInputError(ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class Question:
    question: str
    choices: tuple[str, ...]
    answer: int
    subject: str = ""
    shot: bool = False


def _answer_index(raw: Any, n: int, where: str) -> int:
    if isinstance(raw, bool):
        raise EvalInputError(f"{where}: answer must be an index or a letter")
    if isinstance(raw, int):
        idx = raw
    elif isinstance(raw, str) and len(raw.strip()) == 1 and raw.strip().upper() in LETTERS:
        idx = LETTERS.index(raw.strip().upper())
    else:
        raise EvalInputError(f"{where}: answer {raw!r} is neither an index nor a letter")
    if not 0 <= idx < n:
        raise EvalInputError(f"{where}: answer {raw!r} out of range for {n} choices")
    return idx


def read_questions(path: str | Path) -> list[Question]:
    out = []
    for where, rec in read_objects(path, EvalInputError):
        if not isinstance(rec.get("question"), str):
            raise EvalInputError(f"{where}: expected an object with a string 'question'")
        choices = rec.get("choices")
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
            raise EvalInputError(f"{where}: 'choices' must be a list of at least 2 strings")
        if len(choices) > len(LETTERS):
            raise EvalInputError(f"{where}: more than {len(LETTERS)} choices")
        out.append(Question(rec["question"], tuple(choices), _answer_index(rec.get("answer"), len(choices), where),
                            str(rec.get("subject", "")), bool(rec.get("shot", False))))
    if not out:
        raise EvalInputError(f"{path}: no questions")
    return out


def split_shots(questions: Sequence[Question], k: int) -> tuple[list[Question], list[Question]]:
    """(shots, scored): records marked "shot", else the first k records (InstructEval's BBH)."""
    marked = [q for q in questions if q.shot]
    if marked:
        return marked[:k], [q for q in questions if not q.shot]
    return list(questions[:k]), list(questions[k:])


# ------------------------------------------------------------------------------ InstructEval prompts

CRASS_PAPER_SHOTS = (  # InstructEval crass.py: the few-shot samples of the CRASS paper
    Question("A feather falls from a skyscraper. What would have happened if a computer had fallen from the skyscraper?",
             ("The computer would have remained intact.", "That is not possible.",
              "The computer would have been crushed."), 2),
    Question("A lightning hits a tree. What would have happened if a marble would have hit the tree?",
             ("It would have burned down.", "Nothing special would have happened.",
              "The tree would have kissed the lightning."), 1),
    Question("A man drinks a beer. What would have happened if the man had drunk a rainbow?",
             ("It would have been tasty.", "It would have been awful.", "That is not possible."), 2),
)

HHH_TEMPLATE = hhh.TEMPLATE  # the paper-era template (no "Principles" paragraph), as InstructEval had it at e2eb966


def lettered(q: Question, with_answer: bool) -> str:
    """MMLU/CRASS example: question, lettered options, "Answer:" (+ " X\\n\\n" for a shot)."""
    text = q.question + "".join(f"\n{LETTERS[j]}. {c}" for j, c in enumerate(q.choices)) + "\nAnswer:"
    return text + f" {LETTERS[q.answer]}\n\n" if with_answer else text


def mmlu_header(subject: str) -> str:
    return "The following are multiple choice questions (with answers) about {}.\n\n".format(
        "".join(" " + w for w in subject.split("_")))


@dataclasses.dataclass(frozen=True)
class McPrompt:
    """What to score for one question: context + each continuation (and calibration contexts)."""

    context: str
    continuations: tuple[str, ...]
    calibration: str | None = None  # hhh: subtract each continuation's score on this context


def build_prompt(style: str, q: Question, shots: Sequence[Question]) -> McPrompt:
    if style in ("mmlu", "crass"):
        head = mmlu_header(q.subject) if style == "mmlu" else ""
        context = head + "".join(lettered(s, True) for s in shots) + lettered(q, False)
        return McPrompt(context, tuple(" " + LETTERS[j] for j in range(len(q.choices))))
    if style == "bbh":
        context = "".join(f"{s.question}\nAnswer: {s.choices[s.answer]}\n\n" for s in shots) + f"{q.question}\nAnswer:"
        return McPrompt(context, tuple(" " + c for c in q.choices))
    if style == "hhh":
        if len(q.choices) != 2:
            raise EvalInputError("hhh questions have exactly 2 choices")
        rejected = q.choices[1 - q.answer]
        return McPrompt(HHH_TEMPLATE.format(query=q.question, answera=q.choices[0], answerb=q.choices[1]), ("A", "B"),
                        HHH_TEMPLATE.format(query=q.question, answera=rejected, answerb=rejected))
    raise EvalInputError(f"unknown style {style!r} (one of {', '.join(STYLES)})")


def fit_prompt(style: str, q: Question, shots: Sequence[Question], tokenizer: Any, max_len: int) -> McPrompt:
    """The prompt with as many shots as fit in max_len tokens (InstructEval drops them from the end)."""
    k = len(shots)
    while True:
        prompt = build_prompt(style, q, shots[:k])
        longest = max(prompt.continuations, key=len)
        if k == 0 or len(tokenizer(prompt.context + longest)["input_ids"]) <= max_len:
            return prompt
        k -= 1


def _move_space(context: str, continuation: str) -> tuple[str, str]:
    """Trailing whitespace of the context goes to the continuation (lm-evaluation-harness)."""
    stripped = context.rstrip()
    return stripped, context[len(stripped):] + continuation


def score_mc(model: Any, params: Any, tokenizer: Any, prompts: Sequence[McPrompt], batch_size: int = 8) -> list[list[float]]:
    """Per question, the (calibrated) log-likelihood of each continuation."""
    requests, calib = [], []
    for p in prompts:
        requests += [_move_space(p.context, c) for c in p.continuations]
        if p.calibration is not None:
            calib += [_move_space(p.calibration, c) for c in p.continuations]
    results = score_requests(model, params, tokenizer, requests + calib, batch_size)
    main_ll = iter(r["loglik"] for r in results[:len(requests)])
    calib_ll = iter(r["loglik"] for r in results[len(requests):])
    out = []
    for p in prompts:
        ll = [next(main_ll) for _ in p.continuations]
        if p.calibration is not None:
            ll = [x - next(calib_ll) for x in ll]
        out.append(ll)
    return out


# ------------------------------------------------------------------------------ held-out loss

def make_nll_fn(model: Any):
    """jit fn(params, ids_bt, trained_bt) -> (sum of NLL over trained targets, number of them)."""

    @jax.jit
    def nll(params, ids_bt, trained_bt):
        logits_btv = model.apply({"params": params}, ids_bt[:, :-1]).astype(jnp.float32)
        logp_bt = jnp.take_along_axis(jax.nn.log_softmax(logits_btv, -1), ids_bt[:, 1:, None], -1)[..., 0]
        weight_bt = trained_bt[:, 1:].astype(jnp.float32)
        return -(logp_bt * weight_bt).sum(), weight_bt.sum()

    return nll


def encode_heldout(path: str, tokenizer: Any, max_len: int, cache_dir: str | None = None,
                   max_examples: int | None = None) -> list[tuple[list[int], list[int]]]:
    """(ids, trained mask) per FLAN-Mini record, truncated to max_len as training truncates."""
    from flacuna_jax import templates
    from flacuna_jax.data.sources import open_source

    store = open_source(path, cache_dir=cache_dir)
    seg_tok = templates.SegmentTokenizer.load(tokenizer)
    out = []
    for i in range(len(store) if max_examples is None else min(max_examples, len(store))):
        enc = templates.encode(store[i]["conversations"], seg_tok)
        ids, mask = enc.ids[:max_len], enc.mask[:max_len]
        if any(mask[1:]):
            out.append((ids, mask))
    return out


def heldout_loss(nll_fn: Any, params: Any, examples: Sequence[tuple[list[int], list[int]]],
                 batch_size: int = 8, bucket: int = 64) -> dict:
    total, count = 0.0, 0.0
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i][0]))
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        width = -(-max(len(examples[i][0]) for i in idx) // bucket) * bucket
        ids_bt = np.zeros((batch_size, width), np.int32)
        trained_bt = np.zeros((batch_size, width), np.int32)
        for row, i in enumerate(idx):
            ids, mask = examples[i]
            ids_bt[row, :len(ids)], trained_bt[row, :len(mask)] = ids, mask
        s, n = jax.device_get(nll_fn(params, jnp.asarray(ids_bt), jnp.asarray(trained_bt)))
        total, count = total + float(s), count + float(n)
    loss = total / max(count, 1.0)
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": int(count), "examples": len(examples)}


# ------------------------------------------------------------------------------ the suite

@dataclasses.dataclass
class McTask:
    name: str
    style: str
    prompts: list[McPrompt]
    answers: list[int]
    k: int


class EvalSuite:
    """Everything evaluated, prepared once; `suite(params)` runs it (also from the training loop).

    tasks: (name, style, path) triples; k: shots (None: InstructEval's per style); heldout: a
    FLAN-Mini-format file. In training, build it once and call it with the whole parameter tree,
    `suite(lora.merge_params(trainable, frozen))`; it returns flat metrics such as
    {"heldout/loss", "heldout/perplexity", "heldout/tokens", "heldout/examples", "<task>/acc", "<task>/n"}.
    """

    def __init__(self, model: Any, tokenizer: Any, tasks: Sequence[tuple[str, str, str]] = (), heldout: str | None = None,
                 k: int | None = None, batch_size: int = 8, max_examples: int | None = None, cache_dir: str | None = None):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.max_len = model.config.max_position_embeddings
        self.tasks: list[McTask] = []
        for name, style, path in tasks:
            if style not in STYLES:
                raise EvalInputError(f"task {name}: unknown style {style!r} (one of {', '.join(STYLES)})")
            n_shots = 0 if style == "hhh" else DEFAULT_SHOTS[style] if k is None else k
            questions = [q if q.subject else dataclasses.replace(q, subject=Path(path).stem) for q in read_questions(path)]
            if style == "crass" and not any(q.shot for q in questions):
                shots, scored = list(CRASS_PAPER_SHOTS[:n_shots]), questions
            else:
                shots, scored = split_shots(questions, n_shots)
            self.add_task(name, style, shots, scored[:max_examples])
        self.heldout = encode_heldout(heldout, tokenizer, self.max_len, cache_dir, max_examples) if heldout else None
        self._nll = make_nll_fn(model) if heldout else None

    def add_task(self, name: str, style: str, shots: Sequence[Question], scored: Sequence[Question]) -> None:
        """A task from questions already read (the published benchmark files under --protocol loglik)."""
        if not scored:
            raise EvalInputError(f"task {name}: no questions left to score after {len(shots)} shots")
        prompts = [fit_prompt(style, q, shots, self.tokenizer, self.max_len) for q in scored]
        self.tasks.append(McTask(name, style, prompts, [q.answer for q in scored], len(shots)))

    def __call__(self, params: Any) -> dict[str, float]:
        metrics: dict[str, float] = {}
        for task in self.tasks:
            scores = score_mc(self.model, params, self.tokenizer, task.prompts, self.batch_size)
            correct = [int(np.argmax(s)) == a for s, a in zip(scores, task.answers)]
            metrics[f"{task.name}/acc"] = float(np.mean(correct))
            metrics[f"{task.name}/n"] = len(correct)
        if self.heldout is not None:
            for key, value in heldout_loss(self._nll, params, self.heldout, self.batch_size).items():
                metrics[f"heldout/{key}"] = value
        return metrics


def parse_task(text: str) -> tuple[str, str, str]:
    """"STYLE=PATH" -> (name "STYLE:stem", style, path)."""
    style, sep, path = text.partition("=")
    if not sep or style not in STYLES:
        raise EvalInputError(f"task {text!r}: expected STYLE=PATH with STYLE one of {', '.join(STYLES)}")
    return f"{style}:{Path(path).stem}", style, path
