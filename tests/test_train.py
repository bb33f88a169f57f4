"""The training CLI: exact resume after SIGTERM and kill -9, non-finite stop, configs, metrics."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from flacuna_jax import checkpoint, train
from flacuna_jax.config import load_config
from flacuna_jax.lora import count_params
from flacuna_jax.metrics import read_jsonl
from flacuna_jax.model import Llama, LoraSpec
from flacuna_jax.tiny import PRESETS
from tests.helpers import slow_steps_path, write_train_assets

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return write_train_assets(tmp_path_factory.mktemp("train_assets"))


def overrides(assets, out, **extra):
    base = {"output_dir": str(out), "model.path": assets["model"], "tokenizer.path": assets["model"], "model.compute_dtype": "float32",
            "model.param_dtype": "float32", "model.remat": "none", "data.sources": f"[{assets['sample']}]",
            "data.eval_fraction": 0.05, "train.steps": 10, "train.seq_len": 64, "train.global_batch_size": 4,
            "train.per_device_batch_size": 1, "train.loss_chunk": 16, "lora.rank": 4, "lora.dropout": 0.1,
            "optim.lr": 1e-2, "optim.warmup_steps": 2, "checkpoint.every": 2, "checkpoint.keep": 2,
            "log.every": 1, "eval.every": 5, "eval.max_batches": 2, "mesh.fsdp": 2, "log.tensorboard": True}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def launch(assets, out, sleep=0.0, env=None, log=None, **extra):
    """`python -m flacuna_jax.train` in a subprocess; `env`: more variables (tests/slow_steps hooks),
    `log`: a file for its output (else a pipe)."""
    # Launches share a persistent compilation cache: the same program, compiled once.
    e = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu",
             SLOW_STEP_S=str(sleep), PYTHONPATH=slow_steps_path(), JAX_COMPILATION_CACHE_DIR=assets["jax_cache"],
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", **(env or {}))
    cmd = [sys.executable, "-m", "flacuna_jax.train", "--config", str(ROOT / "configs/demo.yaml"),
           *overrides(assets, out, **extra)]
    output = open(log, "w") if log else subprocess.PIPE
    try:
        return subprocess.Popen(cmd, cwd=ROOT, env=e, stdout=output, stderr=subprocess.STDOUT, text=True)
    finally:
        if log:
            output.close()  # the child has its own copy


def finish(proc, code=0):
    out, _ = proc.communicate(timeout=900)  # a hang guard only: a launch takes ~45 s at load 9 on 2 cores
    assert proc.returncode == code, (out or "")[-3000:]
    return out


@pytest.fixture
def procs():
    """Training subprocesses a test starts; one still running at teardown (the test failed) is killed."""
    started = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def complete_steps(out):
    d = checkpoint.checkpoint_dir(out)
    return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.is_dir() else []


def test_sigterm_and_kill9_then_rerun_is_bit_identical(assets, tmp_path, procs):
    """One run, interrupted twice, logs exactly the losses of an uninterrupted run and ends with the
    same weights: SIGTERM while step 5 runs -> step 5 saved (a second SIGTERM while that save is in flight
    changes nothing; step 5's evaluation is skipped, the only difference), exit code 75; the same command
    resumes at step 5; kill -9 just after a later checkpoint, maybe while its async save is in flight; the
    same command resumes and finishes."""
    ref_dir, crash_dir = tmp_path / "ref", tmp_path / "crash"
    finish(launch(assets, ref_dir))

    # The run waits before reading batch 6, i.e. while step 5 is dispatched and before it is checked,
    # logged, evaluated or saved (tests/slow_steps); SIGTERM arrives there, then it may go on.
    release, log = tmp_path / "release", tmp_path / "sigterm.log"
    procs.append(launch(assets, crash_dir, log=log, env={"PAUSE_AT_BATCH": "6", "PAUSE_UNTIL": str(release),
                                                         "SIGTERM_AFTER_SAVE": "5"}))
    proc = procs[-1]
    deadline = time.time() + 900  # a hang guard only
    while time.time() < deadline and proc.poll() is None and "paused before batch 6 " not in log.read_text():
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be stopped:\n" + log.read_text()[-3000:]
    proc.send_signal(signal.SIGTERM)
    release.touch()
    finish(proc, code=train.EXIT_PREEMPTED)
    text = log.read_text()
    assert train.EXIT_PREEMPTED == 75 and "on SIGTERM: stop after the step in progress" in text, text[-3000:]
    assert "SIGTERM to myself while checkpoint 5 is being saved" in text, text[-3000:]
    assert "step 5: evaluation skipped (stopping for SIGTERM)" in text, text[-3000:]
    stopped = [x for x in text.splitlines() if x.startswith("stopped by SIGTERM")]
    assert stopped == [f"stopped by SIGTERM after step 5 of 10: checkpoint 5 saved in "
                       f"{checkpoint.checkpoint_dir(crash_dir)}; re-run the same command to resume (exit code 75)"]
    assert complete_steps(crash_dir) == [4, 5] and "step 6/10" not in text
    assert [r["step"] for r in read_jsonl(crash_dir / "metrics.jsonl")] == [1, 2, 3, 4, 5]

    # Kill just after a checkpoint, while its async save may still be in flight.
    for kill_after, delay in ((6, 0.2),):
        procs.append(launch(assets, crash_dir, sleep=0.3))
        proc = procs[-1]
        deadline = time.time() + 900  # a hang guard only
        while time.time() < deadline and proc.poll() is None:
            steps = complete_steps(crash_dir)
            if steps and steps[-1] >= kill_after:
                break
            time.sleep(0.01)
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(delay)
        assert proc.poll() is None, "the run ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
        out = proc.communicate()[0]
        assert "resuming from checkpoint step 5 in " in out, out[-2000:]
        assert complete_steps(crash_dir)[-1] < 10
    out = finish(launch(assets, crash_dir))
    assert re.search(r"resuming from checkpoint step \d+ in ", out), out[-2000:]

    ref, got = read_jsonl(ref_dir / "metrics.jsonl"), read_jsonl(crash_dir / "metrics.jsonl")
    assert [r["step"] for r in got] == list(range(1, 11))
    for key in ("loss", "grad_norm", "lr", "tokens", "eval_loss", "skipped_steps", "data_packing_efficiency"):
        want = [None if (key, r["step"]) == ("eval_loss", 5) else r.get(key) for r in ref]
        assert [r.get(key) for r in got] == want, key
    assert ref[4]["eval_loss"] is not None
    s1, p1, cfg = checkpoint.load_trainable(ref_dir)
    s2, p2, _ = checkpoint.load_trainable(crash_dir)
    assert s1 == s2 == 10 and cfg.train.steps == 10
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
        np.testing.assert_array_equal(a, b)
    # The run learned something and wrote its other outputs.
    assert ref[-1]["loss"] < ref[0]["loss"]
    assert (ref_dir / "config.yaml").is_file() and any((ref_dir / "tensorboard").iterdir())
    # Re-running a finished run trains nothing more.
    again = finish(launch(assets, ref_dir))
    assert "nothing to train" in again
    assert read_jsonl(ref_dir / "metrics.jsonl") == ref


def test_in_training_eval_tasks_equal_the_eval_cli(assets, tmp_path):
    """eval.tasks are scored in the loop by the eval CLI's code: the last step's accuracy equals
    `python -m flacuna_jax.eval --run` on the same checkpoint."""
    from flacuna_jax import eval as eval_cli

    rng = np.random.default_rng(0)
    words = ["red", "blue", "green", "cat", "dog", "sun", "tree", "rain"]
    quiz = tmp_path / "quiz.jsonl"
    quiz.write_text("".join(json.dumps({"question": f"Which word follows {w}?", "choices": list(rng.choice(words, 4)),
                                        "answer": int(rng.integers(4))}) + "\n" for w in words * 2))
    out = tmp_path / "run"
    finish(launch(assets, out, **{"eval.tasks": f"[mmlu={quiz}]", "eval.k": 1, "eval.every": 5}))
    evals = [r for r in read_jsonl(out / "metrics.jsonl") if "eval/mmlu:quiz/acc" in r]
    assert [r["step"] for r in evals] == [5, 10] and all(r["eval/mmlu:quiz/n"] == 15 for r in evals)
    cli = eval_cli.main(["--model", assets["model"], "--run", str(out), "--task", f"mmlu={quiz}", "--k", "1",
                         "--dtype", "float32"])["metrics"]
    assert cli["mmlu:quiz/n"] == 15 and cli["mmlu:quiz/acc"] == evals[-1]["eval/mmlu:quiz/acc"]


def test_nonfinite_steps_stop_the_run_with_checkpoint_intact(assets, tmp_path, capsys):
    """Through the CLI's main: NonFiniteError becomes exit code 3 and one 'error:' line on stderr."""
    argv = ["--config", str(ROOT / "configs/demo.yaml"), *overrides(
        assets, tmp_path, **{"optim.lr": 1e30, "optim.warmup_steps": 0, "optim.clip_norm": 0.0,
                             "train.max_nonfinite_steps": 2, "checkpoint.every": 1, "train.steps": 20, "mesh.tensor": 2,
                             "eval.every": 0, "lora.dropout": 0.0, "mesh.fsdp": 4})]
    with pytest.raises(SystemExit) as stop:
        train.main(argv)
    assert stop.value.code == train.EXIT_NONFINITE == 3
    captured = capsys.readouterr()
    assert "train step compiled in" in captured.out
    errors = [line for line in captured.err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "2 consecutive steps" in errors[0], captured.err[-2000:]
    lines = read_jsonl(tmp_path / "metrics.jsonl")
    assert lines[-1]["skipped_steps"] >= 1
    step, params, _ = checkpoint.load_trainable(tmp_path)
    assert 1 <= step < 20 and f"(step {step})" in errors[0]  # the message names the last good checkpoint
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


def test_flacuna_13b_config_is_the_paper_recipe():
    cfg = load_config(ROOT / "configs/flacuna_13b.yaml")
    assert (cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.targets) == (8, 16.0, 0.05, ("q_proj", "v_proj"))
    assert (cfg.train.seq_len, cfg.train.per_device_batch_size, cfg.train.global_batch_size) == (1280, 2, 128)
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.warmup_steps, cfg.optim.schedule) == ("adamw", 2e-5, 3000, "cosine")
    assert (cfg.optim.weight_decay, cfg.optim.clip_norm, cfg.train.steps, cfg.train.epochs) == (0.0, 1.0, None, 1)
    assert (cfg.data.eval_fraction, cfg.data.split_seed, cfg.model.compute_dtype) == (0.005, 0, "bfloat16")
    runtime, lora = train.model_options(cfg)
    assert runtime.compute_dtype == np.dtype("bfloat16") and lora == LoraSpec(8, 16.0, 0.05, ("q_proj", "v_proj"))
    trainable, total = count_params(Llama(PRESETS["llama_13b"], runtime, lora), cfg.finetune)
    assert trainable == 6_553_600
    assert total - trainable == 13_015_864_320  # LLaMA-13B
    load_config(ROOT / "configs/vicuna_7b_lora.yaml")


def test_help_and_bad_override():
    r = subprocess.run([sys.executable, "-m", "flacuna_jax.train", "--help"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0 and "--config" in r.stdout and "key=value" in r.stdout
    r = subprocess.run([sys.executable, "-m", "flacuna_jax.train", "--config", "configs/demo.yaml", "optim.nme=sgd"],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode != 0 and "optim.nme" in r.stderr


def test_metrics_resume_truncation_and_flops(tmp_path):
    from flacuna_jax.metrics import MetricsLogger, flops_per_token, peak_flops, truncate_jsonl

    log = MetricsLogger(tmp_path, total_steps=6, tensorboard=False, progress=False)
    for s in range(1, 6):
        log.log({"step": s, "loss": float("nan") if s == 2 else 1.0 / s, "tokens_per_s": 10.0})
    log.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "lo')  # killed mid-write
    truncate_jsonl(tmp_path / "metrics.jsonl", 3)
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[1]["loss"] is None  # strict JSON: NaN -> null
    assert peak_flops("NVIDIA H100 80GB HBM3", "bfloat16") == peak_flops("NVIDIA H200", "bfloat16") == 989e12
    assert peak_flops("NVIDIA H100 PCIe", "bfloat16") == 756e12
    assert peak_flops("cpu", "float32") is None and peak_flops("NVIDIA H100 80GB HBM3", "float32") is None
    n = 13_015_864_320 - 32000 * 5120 - 81 * 5120  # LLaMA-13B matmul weights: no embedding lookup, no norms
    f_lora, f_full = flops_per_token(PRESETS["llama_13b"], 1280, "lora"), flops_per_token(PRESETS["llama_13b"], 1280, "full")
    assert 4 * n < f_lora < 4.6 * n and f_full - f_lora == 2 * n


def test_one_epoch_step_count_is_exact(assets, tmp_path):
    """train.steps unset: the epoch's steps are counted from the packing plan, exactly the batches the
    loader then yields (the schedule's real length; every process counts the same)."""
    from flacuna_jax import train_data
    from flacuna_jax.data import count_rows
    from flacuna_jax.sharding import make_mesh

    cfg = load_config(ROOT / "configs/demo.yaml", overrides(assets, tmp_path, **{"train.steps": "null"}))
    feed = train_data.DataFeed(cfg, make_mesh(1, -1, 1, jax.devices()[:4]))
    batches = sum(1 for _ in feed.train.iterator())
    assert feed.total_steps == batches > 0 and feed.has_eval
    ex = feed.train.examples
    lengths = [len(ex[i]["ids"]) for i in range(feed.train.report["epoch_examples"]) if ex[i]["drop"] is None]
    assert count_rows(lengths, cfg.train.seq_len) // cfg.train.global_batch_size == batches
