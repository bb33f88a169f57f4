"""The training loop's policies: when it logs, evaluates, saves and stops."""

import pytest

from flacuna_jax.train_policy import (NonFiniteError, is_eval_step, is_log_step, is_save_step, nonfinite_error,
                                      step_record, too_many_nonfinite)


def test_save_every_and_always_the_last_step():
    assert [s for s in range(1, 11) if is_save_step(s, 4, 10)] == [4, 8, 10]
    assert [s for s in range(1, 8) if is_save_step(s, 500, 7)] == [7]


def test_eval_every_at_the_end_and_only_with_something_to_evaluate():
    assert [s for s in range(1, 11) if is_eval_step(s, 3, 10, True)] == [3, 6, 9, 10]
    assert [s for s in range(1, 11) if is_eval_step(s, 0, 10, True)] == [10]
    assert not any(is_eval_step(s, 3, 10, False) for s in range(1, 11))


def test_log_first_last_every_and_with_each_eval():
    assert [s for s in range(1, 13) if is_log_step(s, 5, 12, evaluating=s == 7)] == [1, 5, 7, 10, 12]


def test_nonfinite_limit_and_message():
    assert not too_many_nonfinite({"nonfinite_run": 1}, 2) and too_many_nonfinite({"nonfinite_run": 2}, 2)
    err = nonfinite_error({"nonfinite_run": 2}, 2, 9, "/run/checkpoints", 8)
    assert isinstance(err, NonFiniteError) and "up to step 9" in str(err) and "(step 8)" in str(err)


@pytest.mark.parametrize("mfu", [None, 0.5])
def test_step_record(mfu):
    m = {"loss": 1.5, "lr": 1e-3, "grad_norm": 2.0, "tokens": 100, "skipped_steps": 0}
    rec = step_record(3, m, 2.0, 4096, mfu)
    assert rec["step"] == 3 and rec["tokens_per_s"] == 2048 and rec["step_time_s"] == 2.0
    assert rec.get("mfu") == (None if mfu is None else 0.25)
