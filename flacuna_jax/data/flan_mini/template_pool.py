"""FLAN-style template pools for the sources that are not instructions yet (the three code datasets).

Formatting follows how FLAN v2 (google-research/FLAN ``flan/v2``) casts its own tasks; the
wording here is ours. Each task has a pool of (input, target) patterns over the unit's fields.
One record draws, from its own :class:`~flacuna_jax.data.flan_mini.sampling.Draws`:

- a task among those whose required fields the unit has, and one of its patterns;
- for a multiple-choice task, whether its answer options are listed (``*_opt``) or not
  (``*_noopt``: ``{options_}`` renders as nothing), and in which of the option styles;
- zero-shot or few-shot (``zs_*`` / ``fs_*``): 1..``max_shots`` exemplars of the same task from
  the source's exemplar pool (never from the unit's own row), each rendered with the same pattern,
  ``x`` and ``y`` joined as FLAN joins them (``x\\n\\ny``, exemplars separated by a blank line
  more), or in the labelled style (``Input: x\\nOutput: y``). Exemplars are dropped from the
  end while the prompt is over ``fewshot_max_chars`` (FLAN prunes exemplars to its input
  length the same way); a prompt with none left is zero-shot.

A record is one human turn (exemplars + query) and one gpt turn (the query's target).
Fields whose names end in ``_`` are optional blocks that carry their own leading separator
and may be empty.
"""

from __future__ import annotations

import dataclasses
import string
from typing import Any, Sequence

from flacuna_jax.data.flan_mini.sampling import Draws


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    patterns: tuple[tuple[str, str], ...]
    inputs: tuple[str, ...]  # fields every input pattern shows
    target: str  # the field every target pattern renders
    options: tuple[str, ...] = ()  # a multiple-choice task's answers (the target is one of them)
    needs: tuple[str, ...] = ()  # fields that must be non-empty for the task to apply

    def applies(self, fields: dict[str, Any]) -> bool:
        if any(not fields.get(k) for k in self.needs):
            return False
        return not self.options or fields.get("answer") in self.options


# Option styles: (header, line format, separator before the block). The target is the answer text.
OPTION_STYLES = (
    ("Options:", "- {}", "\n\n"),
    ("Choose one:", "- {}", "\n\n"),
    ("Possible answers:", "* {}", "\n"),
    ("Pick from the following.", "+ {}", "\n\n"),
)
# Few-shot styles: (exemplar template, separator between examples, query template).
FEWSHOT_STYLES = (
    ("{x}\n\n{y}", "\n\n\n", "{x}"),
    ("Input: {x}\nOutput: {y}", "\n\n", "Input: {x}\nOutput:"),
)


def options_block(options: Sequence[str], style: int) -> str:
    header, line, sep = OPTION_STYLES[style]
    return sep + header + "\n" + "\n".join(line.format(o) for o in options)


def pattern_fields(pattern: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(pattern) if name}


@dataclasses.dataclass(frozen=True)
class Rendered:
    conversations: list[dict[str, str]]
    task: str
    template_type: str  # zs_opt | zs_noopt | fs_opt | fs_noopt
    shots: int


def _fill(pattern: tuple[str, str], fields: dict[str, Any], options_: str) -> tuple[str, str]:
    values = {**fields, "options_": options_}
    return pattern[0].format(**values), pattern[1].format(**values)


def render(fields: dict[str, Any], tasks: Sequence[Task], draws: Draws, pool: Sequence[dict[str, Any]],
           *, fewshot: float, with_options: float, max_shots: int, max_chars: int) -> Rendered:
    """One record of a templated unit. ``pool`` holds other units' fields (the exemplar pool);
    units of the same row (``_row``: the unit itself, or another solution of the same problem,
    which would give the answer away) are never its exemplars."""
    applicable = [t for t in tasks if t.applies(fields)]
    if not applicable:
        raise ValueError("no task applies to this unit")
    task = applicable[draws.below(len(applicable))]
    pattern = task.patterns[draws.below(len(task.patterns))]
    listed = bool(task.options) and draws.chance(with_options)
    options_ = options_block(task.options, draws.below(len(OPTION_STYLES))) if listed else ""
    x, y = _fill(pattern, fields, options_)
    shots: list[tuple[str, str]] = []
    if draws.chance(fewshot):
        candidates = [p for p in pool if p.get("_row") != fields.get("_row") and task.applies(p)]
        k = 1 + draws.below(max_shots)
        shots = [_fill(pattern, candidates[i], options_) for i in draws.pick(len(candidates), k)]
    style = FEWSHOT_STYLES[draws.below(len(FEWSHOT_STYLES))]
    prompt = x
    while shots:
        prompt = style[1].join([style[0].format(x=sx, y=sy) for sx, sy in shots] + [style[2].format(x=x)])
        if len(prompt) <= max_chars:
            break
        shots.pop()
    if not shots:
        prompt = x
    kind = ("fs" if shots else "zs") + ("_opt" if listed else "_noopt")
    return Rendered([{"from": "human", "value": prompt}, {"from": "gpt", "value": y}], task.name, kind, len(shots))


# ---- the pools ------------------------------------------------------------------------------------
# code_search_net fields: code (the function without its docstring), function (as published, with
# it), docstring, func_name, language (display name), answer (= language, for language_id).
_CSN = (
    Task("summarize", (
        ("{code}\n\nWrite a short docstring that says what this {language} function does.", "{docstring}"),
        ("What does the following {language} function do? Answer in a sentence or two.\n\n{code}", "{docstring}"),
        ("Here is a function written in {language}:\n\n{code}\n\nDescribe its purpose in plain English.",
         "{docstring}"),
        ("Document this code.\n\n{code}", "{docstring}"),
        ("{code}\n\nExplain what the function above is for, as its documentation comment would.", "{docstring}"),
        ("Read the {language} code below and write the documentation it is missing.\n\n{code}", "{docstring}"),
        ("Function `{func_name}`:\n{code}\n\nWhat is this function for?", "{docstring}"),
        ("Summarize the behaviour of `{func_name}`.\n\n{code}", "{docstring}"),
    ), inputs=("code",), target="docstring", needs=("code", "docstring")),
    Task("generate", (
        ("Write a {language} function named `{func_name}` that does the following: {docstring}", "{function}"),
        ("{docstring}\n\nImplement this in {language}.", "{function}"),
        ("Task: {docstring}\nLanguage: {language}\nFunction name: {func_name}\n\nWrite the code.", "{function}"),
        ("Implement `{func_name}` in {language}. Its documentation says:\n\n{docstring}", "{function}"),
        ("Here is the description of a {language} function:\n{docstring}\n\nWrite the function.", "{function}"),
        ("Can you write {language} code for `{func_name}`? It should do this: {docstring}", "{function}"),
    ), inputs=("docstring",), target="function", needs=("docstring", "function")),
    Task("language_id", (
        ("{code}\n\nWhich programming language is this code written in?{options_}", "{answer}"),
        ("Identify the programming language of the following snippet.{options_}\n\n{code}", "{answer}"),
        ("What language is this?\n\n{code}{options_}", "{answer}"),
        ("Code:\n{code}\n\nQuestion: in which language was this function written?{options_}\nAnswer:", "{answer}"),
        ("Determine the language of this function.\n\n{code}{options_}", "{answer}"),
    ), inputs=("code", "options_"), target="answer", needs=("code",),
        options=("Go", "Java", "JavaScript", "PHP", "Python", "Ruby")),
)

# code_contests fields: name, description, solution, language (display name), answer (= language).
_CODE_CONTESTS = (
    Task("solve", (
        ("Solve the following competitive programming problem in {language}.\n\n{description}", "{solution}"),
        ("{description}\n\nWrite a {language} program that solves this problem.", "{solution}"),
        ("Problem: {name}\n\n{description}\n\nGive a solution in {language}.", "{solution}"),
        ("Write {language} code for this task. Read the input from standard input and print the answer to "
         "standard output.\n\n{description}", "{solution}"),
        ("Here is a programming contest problem:\n\n{description}\n\nHow would you solve it in {language}? "
         "Answer with code.", "{solution}"),
        ("Implement a solution in {language}.\n\n{description}", "{solution}"),
    ), inputs=("description", "language"), target="solution", needs=("description", "solution")),
    Task("language_id", (
        ("{solution}\n\nWhich language is this program written in?{options_}", "{answer}"),
        ("Identify the language of this competitive programming solution.{options_}\n\n{solution}", "{answer}"),
        ("What programming language does the code below use?\n\n{solution}{options_}", "{answer}"),
        ("Program:\n{solution}\n\nWhich language is it?{options_}", "{answer}"),
    ), inputs=("solution", "options_"), target="answer", needs=("solution",),
        options=("C++", "Java", "Python 2", "Python 3")),
)

# apps fields: question, solution, starter_ and io_ (optional blocks), answer (= difficulty).
_APPS = (
    Task("solve", (
        ("{question}{starter_}{io_}\n\nWrite a Python solution.", "{solution}"),
        ("Solve this programming problem in Python.\n\n{question}{starter_}{io_}", "{solution}"),
        ("Problem statement:\n{question}{starter_}{io_}\n\nAnswer with Python code.", "{solution}"),
        ("Write Python code to solve the task below.{io_}\n\n{question}{starter_}", "{solution}"),
        ("{question}{io_}{starter_}\n\nHow would you implement this in Python?", "{solution}"),
    ), inputs=("question", "starter_", "io_"), target="solution", needs=("question", "solution")),
    Task("difficulty", (
        ("{question}\n\nHow hard is this programming problem?{options_}", "{answer}"),
        ("Rate the difficulty of the following problem.{options_}\n\n{question}", "{answer}"),
        ("Problem:\n{question}\n\nWould you call this an introductory, an interview or a competition "
         "problem?{options_}", "{answer}"),
        ("What level of difficulty would you give this task?\n\n{question}{options_}", "{answer}"),
    ), inputs=("question", "options_"), target="answer", needs=("question",),
        options=("introductory", "interview", "competition")),
)

POOLS: dict[str, tuple[Task, ...]] = {"code_search_net": _CSN, "code_contests": _CODE_CONTESTS, "apps": _APPS}
