"""Readers of the code datasets, in the schemas they are published in on the hub; their units are
cast into instructions by ``template_pool.POOLS``.

- ``code_search_net`` (``code_search_net``, one function per row): ``func_name``,
  ``whole_func_string``, ``language`` (go, java, javascript, php, python, ruby),
  ``func_code_string``, ``func_documentation_string`` (the other published columns are not
  needed). Fields for the templates: ``function`` as published, ``code`` the same without its
  docstring (so that summarizing it is not copying), ``docstring`` its first paragraph.
- ``code_contests`` (``deepmind/code_contests``, one problem per row): ``name``, ``description``,
  ``solutions: {"language": [int], "solution": [str]}`` (``datasets``' sequence-of-struct
  layout; language 1 Python 2, 2 C++, 3 Python 3, 4 Java; 0, unknown, is not used). One unit per
  correct solution, as Table 1 counts more records than there are problems.
- ``apps`` (``codeparrot/apps``): ``question``, ``solutions`` (a JSON list of Python programs, as a
  string; may be empty), ``input_output`` (a JSON string; ``fn_name`` marks call-based problems),
  ``difficulty``, ``starter_code``. One unit per solution.
"""

from __future__ import annotations

import json

from flacuna_jax.data.flan_mini.schema import Reader, field
from flacuna_jax.data.records import DataError

CSN_LANGUAGES = {"go": "Go", "java": "Java", "javascript": "JavaScript", "php": "PHP", "python": "Python",
                 "ruby": "Ruby"}
CONTEST_LANGUAGES = {1: "Python 2", 2: "C++", 3: "Python 3", 4: "Java"}
CONTEST_LANGUAGE_NAMES = {"PYTHON": 1, "CPP": 2, "PYTHON3": 3, "JAVA": 4, "UNKNOWN_LANGUAGE": 0}


def first_paragraph(doc: str) -> str:
    lines = doc.strip().splitlines()
    out = []
    for line in lines:
        if not line.strip():
            break
        out.append(line.strip())
    return " ".join(out)


def strip_docstring(code: str, doc: str, language: str) -> str:
    """``code`` without the literal or leading comment that holds ``doc`` (unchanged if not found)."""
    first = doc.strip().splitlines()[0].strip() if doc.strip() else ""
    if not first:
        return code
    if language == "python":
        for quote in ('"""', "'''"):
            start = code.find(quote)
            while start >= 0:
                end = code.find(quote, start + 3)
                if end < 0:
                    break
                if first in code[start + 3:end]:
                    line_start = code.rfind("\n", 0, start) + 1
                    line_end = code.find("\n", end + 3)
                    line_end = len(code) if line_end < 0 else line_end + 1
                    if code[line_start:start].strip() in ("", "r", "u", "R", "U") and not code[end + 3:line_end].strip():
                        return code[:line_start] + code[line_end:]
                    return code[:start] + code[end + 3:]
                start = code.find(quote, end + 3)
        return code
    body = code.lstrip()
    if body.startswith("/*") and "*/" in body and first in body[:body.index("*/")]:
        return body[body.index("*/") + 2:].lstrip("\n")
    lines = body.splitlines(keepends=True)
    k = 0
    while k < len(lines) and lines[k].lstrip().startswith(("//", "#")):
        k += 1
    if k and first in "".join(lines[:k]):
        return "".join(lines[k:])
    return code


class CodeSearchNetReader(Reader):
    name = "code_search_net"
    templated = True
    columns = ("func_name", "whole_func_string", "language", "func_code_string", "func_documentation_string")

    def unit(self, row: dict, sub: int, where: str) -> dict:
        func_name = field(row, "func_name", where)
        function = field(row, "whole_func_string", where, nonempty=True)
        language = field(row, "language", where)
        if language not in CSN_LANGUAGES:
            raise DataError(f"{where}: field 'language' is {language!r}, expected one of {sorted(CSN_LANGUAGES)}")
        field(row, "func_code_string", where)
        doc = field(row, "func_documentation_string", where)
        return {"function": function.strip("\n"), "code": strip_docstring(function, doc, language).strip("\n"),
                "docstring": first_paragraph(doc), "func_name": func_name, "language": CSN_LANGUAGES[language],
                "answer": CSN_LANGUAGES[language]}


def _contest_solutions(row: dict, where: str) -> tuple[list, list]:
    sols = field(row, "solutions", where, dict)
    langs, texts = sols.get("language"), sols.get("solution")
    if hasattr(langs, "tolist"):
        langs = langs.tolist()
    if hasattr(texts, "tolist"):
        texts = texts.tolist()
    if not isinstance(langs, list) or not isinstance(texts, list) or len(langs) != len(texts):
        raise DataError(f"{where}: field 'solutions' must be {{\"language\": [...], \"solution\": [...]}} "
                        "with lists of the same length")
    codes = []
    for j, (lang, text) in enumerate(zip(langs, texts)):
        if isinstance(lang, str) and lang in CONTEST_LANGUAGE_NAMES:
            lang = CONTEST_LANGUAGE_NAMES[lang]
        if not isinstance(lang, int) or isinstance(lang, bool) or not 0 <= lang <= 4:
            raise DataError(f"{where}: solutions.language[{j}] is {lang!r}, expected 0..4")
        if not isinstance(text, str):
            raise DataError(f"{where}: solutions.solution[{j}] is {type(text).__name__}, expected a string")
        codes.append(lang)
    return codes, texts


class CodeContestsReader(Reader):
    name = "code_contests"
    templated = True
    expands = True
    columns = ("name", "description", "solutions")  # not the tests: megabytes a problem
    count_columns = ("solutions",)

    def units(self, row: dict, where: str) -> list[int]:
        langs, texts = _contest_solutions(row, where)
        return [j for j, (lang, text) in enumerate(zip(langs, texts)) if lang in CONTEST_LANGUAGES and text.strip()]

    def unit(self, row: dict, sub: int, where: str) -> dict:
        langs, texts = _contest_solutions(row, where)
        name = field(row, "name", where)
        description = field(row, "description", where, nonempty=True)
        language = CONTEST_LANGUAGES[langs[sub]]
        return {"name": name, "description": description.strip(), "solution": texts[sub].strip("\n"),
                "language": language, "answer": language}


def _apps_solutions(row: dict, where: str) -> list:
    raw = field(row, "solutions", where)
    if not raw.strip():
        return []
    try:
        sols = json.loads(raw)
    except json.JSONDecodeError as e:
        raise DataError(f"{where}: field 'solutions' is not valid JSON ({e.msg})") from None
    if not isinstance(sols, list) or not all(isinstance(s, str) for s in sols):
        raise DataError(f"{where}: field 'solutions' must hold a JSON list of strings")
    return sols


class AppsReader(Reader):
    name = "apps"
    templated = True
    expands = True
    columns = ("question", "solutions", "input_output", "difficulty", "starter_code")
    count_columns = ("solutions",)

    def units(self, row: dict, where: str) -> list[int]:
        return [j for j, s in enumerate(_apps_solutions(row, where)) if s.strip()]

    def unit(self, row: dict, sub: int, where: str) -> dict:
        sols = _apps_solutions(row, where)
        question = field(row, "question", where, nonempty=True)
        difficulty = field(row, "difficulty", where)
        starter = field(row, "starter_code", where, optional=True) or ""
        io_raw = field(row, "input_output", where, optional=True) or ""
        io_ = ""
        if io_raw.strip():
            try:
                io = json.loads(io_raw)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: field 'input_output' is not valid JSON ({e.msg})") from None
            fn_name = io.get("fn_name") if isinstance(io, dict) else None
            io_ = (f"\n\nWrite the function `{fn_name}`: the tests call it with their inputs as arguments."
                   if isinstance(fn_name, str) and fn_name else
                   "\n\nRead the input from standard input and print the answer to standard output.")
        starter_ = f"\n\nStart from this code:\n{starter.strip(chr(10))}" if starter.strip() else ""
        return {"question": question.strip(), "solution": sols[sub].strip("\n"), "starter_": starter_, "io_": io_,
                "answer": difficulty}
