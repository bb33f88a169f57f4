"""MMLU (hendrycks/test) as InstructEval's mmlu.py at e2eb966 evaluates it.

Files: `DIR/dev/<subject>_dev.csv` (the shots) and `DIR/test/<subject>_test.csv`, no header, columns
question, A, B, C, D, answer letter. They are read with pandas' default CSV parsing, as InstructEval
reads them, so its quirks carry over (a cell "None" or "NA" becomes NaN and prints "nan"; a column
of numbers prints as Python prints them).

Prompt, per test question, with the first k of the subject's dev rows as shots (k = 5, dropped from
the end while the prompt is longer than 2048 tokens):

    "The following are multiple choice questions (with answers) about {subject}.\\n\\n"
    + for each shot "{q}\\nA. {a}\\nB. {b}\\nC. {c}\\nD. {d}\\nAnswer: {letter}\\n\\n"
    + "{q}\\nA. {a}\\nB. {b}\\nC. {c}\\nD. {d}\\nAnswer:"

where {subject} is " " + each word of the file's subject joined (hence two spaces after "about").
Greedy decoding of 2 new tokens; correct when output.strip().startswith(answer letter); the score is
the mean over all questions of all subjects (InstructEval's "weighted" accuracy). Subjects in
sorted order, as InstructEval lists them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from flacuna_jax.evals.benchmark import (BenchmarkInputError, Example, Generate, Options, PrefixBenchmark,
                                         fit_shots, micro_average)

SHOTS = 5
REQUEST = Generate(max_new_tokens=2, max_input_tokens=2048)
LETTERS = "ABCD"


def subject_header(subject: str) -> str:
    return "The following are multiple choice questions (with answers) about {}.\n\n".format(
        "".join(" " + word for word in subject.split("_")))


def format_question(row: list[Any], with_answer: bool) -> str:
    """row = [question, option...,  answer letter]; cells printed with str.format, as pandas gave them."""
    text = "{}".format(row[0]) + "".join("\n{}. {}".format(LETTERS[j], row[j + 1]) for j in range(len(row) - 2))
    text += "\nAnswer:"
    return text + " {}\n\n".format(row[-1]) if with_answer else text


def read_rows(path: Path) -> list[list[Any]]:
    """The CSV's rows as pandas parses them (header=None), each checked: 6 cells, answer a letter A-D."""
    import pandas as pd

    try:
        frame = pd.read_csv(path, header=None)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise BenchmarkInputError(f"{path}: not a readable MMLU CSV ({str(e).splitlines()[0]})") from None
    if frame.shape[1] != 6:
        raise BenchmarkInputError(f"{path}: expected 6 columns (question, A, B, C, D, answer), found {frame.shape[1]}")
    rows = frame.values.tolist()
    for i, row in enumerate(rows):
        if not isinstance(row[0], str):
            raise BenchmarkInputError(f"{path}: record {i + 1}: the question is not text ({row[0]!r})")
        if row[-1] not in tuple(LETTERS):
            raise BenchmarkInputError(f"{path}: record {i + 1}: answer {row[-1]!r} is not one of A, B, C, D")
    return rows


def subjects_in(root: Path) -> list[str]:
    test = root / "test"
    if not test.is_dir():
        raise BenchmarkInputError(f"{root}: no test/ directory (expected hendrycks' MMLU layout DIR/test/<subject>_test.csv)")
    names = sorted(f.name[:-len("_test.csv")] for f in test.iterdir() if f.name.endswith("_test.csv"))
    if not names:
        raise BenchmarkInputError(f"{test}: no <subject>_test.csv files")
    return names


def load(path: str, options: Options) -> PrefixBenchmark:
    root = Path(path)
    shots = SHOTS if options.shots is None else options.shots
    subjects = []
    for subject in subjects_in(root):
        dev_path = root / "dev" / f"{subject}_dev.csv"
        if shots and not dev_path.is_file():
            raise BenchmarkInputError(f"{dev_path}: missing (the shots of {subject})")
        dev = read_rows(dev_path)[:shots] if shots else []
        test = read_rows(root / "test" / f"{subject}_test.csv")[:options.max_examples]
        subjects.append((subject, dev, test))

    def build(fits: Callable[[str], bool]) -> list[Example]:
        out = []
        for subject, dev, test in subjects:
            for i, row in enumerate(test):
                end = format_question(row, False)

                def prompt(k: int) -> str:
                    return subject_header(subject) + "".join(format_question(r, True) for r in dev[:k]) + end

                out.append(Example(subject, i, fit_shots(prompt, len(dev), fits), str(row[-1])))
        return out

    return PrefixBenchmark("mmlu", REQUEST, build, micro_average)
