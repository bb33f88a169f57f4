"""The FLAN-style template pool: every pattern renders every field; zero-/few-shot and options as FLAN."""

import re

import pytest

from flacuna_jax.data.flan_mini import template_pool
from flacuna_jax.data.flan_mini.readers import READERS
from flacuna_jax.data.flan_mini.sampling import Draws, key_order, unit_keys
from flacuna_jax.data.flan_mini.template_pool import POOLS, Task, pattern_fields, render
from tests.flan_mini_sources import apps_rows, contest_rows, csn_rows

ROWS = {"code_search_net": csn_rows(12), "code_contests": contest_rows(6), "apps": apps_rows(6)}
BRACES = re.compile(r"[{}]")


def units(reader_name):
    reader = READERS[reader_name]
    out = []
    for i, row in enumerate(ROWS[reader_name]):
        for sub in reader.units(row, f"row {i}"):
            out.append({**reader.unit(row, sub, f"row {i}"), "_row": i})
    return out


def test_every_templated_reader_has_a_pool_and_only_they_do():
    assert {n for n, r in READERS.items() if r.templated} == set(POOLS)


@pytest.mark.parametrize("name", sorted(POOLS))
def test_every_pattern_renders_every_field(name):
    us = units(name)
    assert len(us) >= 6
    for task in POOLS[name]:
        assert len(task.patterns) >= 4, task.name
        for x_pat, y_pat in task.patterns:
            # every input pattern shows the task's inputs; the target renders its field
            assert set(task.inputs) <= pattern_fields(x_pat), (task.name, x_pat)
            assert pattern_fields(y_pat) == {task.target}, (task.name, y_pat)
            assert ("options_" in pattern_fields(x_pat)) == bool(task.options), (task.name, x_pat)
            for u in us:
                if not task.applies(u):
                    continue
                for listed in ([True, False] if task.options else [False]):
                    opts = template_pool.options_block(task.options, 0) if listed else ""
                    x, y = template_pool._fill((x_pat, y_pat), u, opts)
                    assert not BRACES.search(x) and not BRACES.search(y), (x, y)  # no {placeholder} left
                    assert x.strip() and y.strip() and x == x.strip() and y == y.strip()
                    for f in task.inputs:
                        if f != "options_":
                            assert u[f] in x
                    assert y == u[task.target]
                    assert all(o in x for o in task.options) if listed else "Options:" not in x


@pytest.mark.parametrize("name", sorted(POOLS))
def test_render_draws_every_task_pattern_and_format(name):
    us = units(name)
    tasks = POOLS[name]
    seen_patterns, kinds, shot_counts = set(), set(), set()
    keys = unit_keys(7, list(range(400)))
    for k in range(400):
        u = us[k % len(us)]
        r = render(u, tasks, Draws(int(keys[k])), us, fewshot=0.5, with_options=0.5, max_shots=3, max_chars=100_000)
        task = next(t for t in tasks if t.name == r.task)
        human, gpt = r.conversations[0]["value"], r.conversations[1]["value"]
        assert [t["from"] for t in r.conversations] == ["human", "gpt"] and human.strip() and gpt.strip()
        assert gpt == u[task.target]
        kinds.add(r.template_type)
        shot_counts.add(r.shots)
        assert r.template_type.startswith("fs" if r.shots else "zs")
        assert r.template_type.endswith("_opt") == ("Options:" in human or "Choose one:" in human
                                                   or "Possible answers:" in human or "Pick from" in human)
        if task.options:
            assert r.template_type.endswith("_opt") or not any(f"- {o}\n" in human + "\n" for o in task.options)
        for p in task.patterns:
            if p[0].split("{")[0] and human.find(p[0].split("{")[0]) >= 0:
                seen_patterns.add((task.name, p))
    assert {t.name for t in tasks} == {n for n, _ in seen_patterns}
    assert {"zs", "fs"} <= {k[:2] for k in kinds} and {1, 2, 3} <= shot_counts
    if any(t.options for t in tasks):
        assert {"zs_opt", "zs_noopt", "fs_opt", "fs_noopt"} <= kinds


def test_few_shot_exemplars_are_same_task_other_rows_and_fit_the_budget():
    us = units("code_contests")  # 3 solutions per problem: a same-row exemplar would give the answer away
    solve = [t for t in POOLS["code_contests"] if t.name == "solve"]
    query = us[0]
    for seed in range(200):
        r = render(query, solve, Draws(seed), us, fewshot=1.0, with_options=0.0, max_shots=3, max_chars=100_000)
        human = r.conversations[0]["value"]
        assert r.shots >= 1 and r.template_type == "fs_noopt"
        same_row = [u["solution"] for u in us if u["_row"] == query["_row"] and u is not query]
        assert not any(s in human for s in same_row)
        assert human.count("Given two integers") == r.shots + 1  # every exemplar is the same task
    budget = len(query["description"]) + 200
    for seed in range(50):
        r = render(query, solve, Draws(seed), us, fewshot=1.0, with_options=0.0, max_shots=3, max_chars=budget)
        assert len(r.conversations[0]["value"]) <= budget or r.shots == 0
        assert r.template_type.startswith("fs" if r.shots else "zs")


def test_a_unit_no_task_applies_to_is_refused_and_options_need_a_known_answer():
    task = Task("t", (("{a}", "{answer}"),), inputs=("a",), target="answer", options=("x", "y"), needs=("a",))
    assert task.applies({"a": "1", "answer": "x"})
    assert not task.applies({"a": "1", "answer": "z"}) and not task.applies({"a": "", "answer": "x"})
    with pytest.raises(ValueError, match="no task applies"):
        render({"a": "", "answer": "x"}, [task], Draws(0), [], fewshot=0, with_options=0, max_shots=1, max_chars=10)


def test_draws_and_keys_are_fixed_bit_patterns():
    """The same numbers on every machine: pinned values of the splitmix64 streams."""
    d = Draws(0)
    assert [d.next() for _ in range(2)] == [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4]
    k = unit_keys(0, [0, 1, 2])
    assert k.dtype.name == "uint64" and len(set(k.tolist())) == 3
    assert list(key_order(k)) == sorted(range(3), key=lambda i: int(k[i]))
    assert Draws(5).pick(10, 3) == Draws(5).pick(10, 3) and len(set(Draws(5).pick(10, 10))) == 10
