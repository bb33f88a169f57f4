"""The training loop's policies, each a small pure function: when to log, evaluate and save, what a
log line holds, and when non-finite steps stop the run."""

from __future__ import annotations

from typing import Any


class NonFiniteError(RuntimeError):
    pass


def is_save_step(step: int, every: int, total: int) -> bool:
    """Checkpoint after every `every` steps and always after the last one."""
    return step % every == 0 or step == total


def is_eval_step(step: int, every: int, total: int, can_eval: bool) -> bool:
    """Evaluate every `every` steps (0: never in between) and after the last one, when there is
    anything to evaluate."""
    return can_eval and ((every > 0 and step % every == 0) or step == total)


def is_log_step(step: int, every: int, total: int, evaluating: bool) -> bool:
    """A metrics line every `every` steps, after the first and the last, and with every evaluation."""
    return step % every == 0 or step in (1, total) or evaluating


def too_many_nonfinite(metrics: dict, limit: int) -> bool:
    """Whether `limit` consecutive updates have been skipped as non-finite (the run must stop)."""
    return int(metrics["nonfinite_run"]) >= limit


def nonfinite_error(metrics: dict, limit: int, step: int, ckpt_dir: Any, last_saved: int | None) -> NonFiniteError:
    return NonFiniteError(
        f"stopping: {int(metrics['nonfinite_run'])} consecutive steps (up to step {step}) had a non-finite loss or "
        f"gradient (train.max_nonfinite_steps={limit}); their updates were skipped. The last good checkpoint is in "
        f"{ckpt_dir} (step {last_saved}). Lower optim.lr, check the data, or use model.compute_dtype=float32.")


def step_record(step: int, metrics: dict, dt: float, tokens_per_step: int, mfu_per_s: float | None) -> dict:
    """The metrics.jsonl line of a step: `mfu_per_s` is model FLOPs / (peak FLOP/s x devices) of one
    step, so MFU = mfu_per_s / dt (None where the chip's peak is unknown)."""
    rec = {"step": step, "loss": float(metrics["loss"]), "lr": float(metrics["lr"]),
           "grad_norm": float(metrics["grad_norm"]), "tokens": int(metrics["tokens"]),
           "tokens_per_s": tokens_per_step / dt, "step_time_s": dt, "skipped_steps": int(metrics["skipped_steps"])}
    if mfu_per_s is not None:
        rec["mfu"] = mfu_per_s / dt
    return rec
