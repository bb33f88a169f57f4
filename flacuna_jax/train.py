"""Fine-tune a LLaMA-family model on FLAN-Mini (LoRA or full), sharded over a device mesh.

    python -m flacuna_jax.train --config configs/demo.yaml [key=value ...]
    python -m flacuna_jax.train --config configs/flacuna_13b.yaml output_dir=runs/flacuna train.steps=100

Overrides are `key=value` with the value parsed as YAML (`lora.targets='[q_proj, k_proj]'`).
The resolved config is printed, and saved to `output_dir/config.yaml` once it has been checked
(model, data, and against the checkpoints already there). Re-running the same command with the same
output_dir resumes from the latest checkpoint there (step, trainable params, optimizer state, RNG
and the data iterator), so the result equals an uninterrupted run, also on another number of
processes or devices (the global batch of a step does not depend on them). A resume whose
defining keys (base model, tokenizer, finetune, LoRA shape, data stream: `run_spec.py`) differ
from the checkpoints' is refused.

The loss is the mean token cross-entropy over ALL trained (assistant-answer) tokens of the global
batch (not a mean of per-example means). What trains is kept in float32 (master weights and
optimizer state), whatever `model.param_dtype` the frozen base is stored in. Global batch = per_device_batch_size x (mesh.data x
mesh.fsdp) x gradient-accumulation steps. Non-finite updates are skipped and counted;
train.max_nonfinite_steps of them in a row stop the run (exit code 3), the last checkpoint intact.

SIGTERM (preemption, time limit, pod deletion; in a multi-process job sent to any one process) stops
the run after the step in progress (every process after the same step), checkpoints that step, waits
for the save and exits with code 75; re-running the same command resumes from it (`preemption.py`).

Writes into output_dir: config.yaml, metrics.jsonl (one line per log.every steps), tensorboard/,
checkpoints/<step>/ (never the frozen base). Export with `python -m flacuna_jax.convert export`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
import time
from typing import Any, Callable

import jax
import numpy as np

from flacuna_jax import distributed
from flacuna_jax.checkpoint import Checkpointer, checkpoint_dir, latest_complete_step, stored_spec
from flacuna_jax.config import Config, ConfigError, dump_config, load_config
from flacuna_jax.lora import count_params, init_lora_params, merge_params, split_params
from flacuna_jax.metrics import MetricsLogger, flops_per_token, peak_flops
from flacuna_jax.model import abstract_params
from flacuna_jax.preemption import EXIT_PREEMPTED, PreemptionWatch
from flacuna_jax.run_spec import check_resume, run_spec
from flacuna_jax.sharding import make_mesh, tree_shardings
from flacuna_jax.step import make_eval_step
from flacuna_jax.storage import run_path, write_text_atomic
from flacuna_jax.train_compile import (MASTER_DTYPE, batch_layout, compile_train_step, configured_train_step,
                                       master_shapes, model_options)
from flacuna_jax.train_data import DataFeed
from flacuna_jax.train_policy import (NonFiniteError, is_eval_step, is_log_step, is_save_step, nonfinite_error,
                                      step_record, too_many_nonfinite)
from flacuna_jax.train_state import abstract_state, init_train_state, state_shardings

EXIT_NONFINITE = 3
__all__ = ["EXIT_NONFINITE", "EXIT_PREEMPTED", "NonFiniteError", "build_model", "main", "run"]


def adapter_params(cfg: Config, model: Any, p_shapes: Any, p_shard: Any) -> Any:
    """LoRA factors from the PEFT adapter dir `lora.init_from`, checked against the config, on the mesh."""
    from flacuna_jax import peft_io

    spec, loaded = peft_io.load_adapter(cfg.lora.init_from, model.config)
    # Targets are a set (PEFT stores them in any order); alpha matters too: it sets the scale alpha/r.
    if (spec.rank, set(spec.targets), float(spec.alpha)) != (cfg.lora.rank, set(cfg.lora.targets), float(cfg.lora.alpha)):
        raise ConfigError(f"config key 'lora.init_from': the adapter has rank {spec.rank}, alpha {spec.alpha:g} and "
                          f"targets {sorted(spec.targets)}; the config says rank {cfg.lora.rank}, alpha "
                          f"{cfg.lora.alpha:g} and {sorted(cfg.lora.targets)}")
    if jax.tree.structure(loaded) != jax.tree.structure(p_shapes):
        raise ConfigError(f"config key 'lora.init_from': {cfg.lora.init_from} does not hold this model's LoRA factors")
    return jax.tree.map(lambda x, s, sh: jax.device_put(np.asarray(x, s.dtype), sh), loaded, p_shapes, p_shard)


def build_model(cfg: Config, mesh: Any) -> tuple[Any, Any, Any, Any, Any]:
    """(model, frozen, trainable, trainable shapes, trainable shardings) on the mesh; what trains is
    float32 (master weights), the frozen base stays in model.param_dtype."""
    from flacuna_jax.hf import load_pretrained

    if not cfg.model.path:
        raise ConfigError("config key 'model.path': required (a local Hugging Face LLaMA directory)")
    runtime, lora = model_options(cfg)
    model, base = load_pretrained(cfg.model.path, runtime, lora, mesh)
    shapes, names = abstract_params(model)
    p_shapes, p_names = master_shapes(split_params(shapes, cfg.finetune)[0]), split_params(names, cfg.finetune)[0]
    p_shard = tree_shardings(mesh, p_names, p_shapes)
    if cfg.finetune == "lora" and cfg.lora.init_from:
        trainable, frozen = adapter_params(cfg, model, p_shapes, p_shard), base
    elif cfg.finetune == "lora":
        trainable, frozen = init_lora_params(model, jax.random.PRNGKey(cfg.seed), p_shard), base
    else:
        weights, frozen = split_params(base, "full")
        trainable = jax.jit(lambda t: jax.tree.map(lambda x: x.astype(MASTER_DTYPE), t), out_shardings=p_shard,
                            donate_argnums=(0,))(weights)
    return model, frozen, trainable, p_shapes, p_shard


def eval_suite(cfg: Config, model: Any, tokenizer: Any) -> Any:
    """The `eval.tasks` suites, prepared once: multiple-choice tasks (the same code as `python -m
    flacuna_jax.eval`) and `lm_eval:<task>` entries (lm-eval tasks on `flacuna_jax.lm_eval`'s backend).
    Returns params -> {name/metric: value}."""
    from flacuna_jax.evals.loglik import EvalInputError, EvalSuite, parse_task

    if jax.process_count() > 1:
        raise ConfigError("config key 'eval.tasks': multiple-choice tasks are scored in single-process runs only; "
                          "score a multi-host run's export with python -m flacuna_jax.eval")
    prefix = "lm_eval:"
    ours = [t for t in cfg.eval.tasks if not t.startswith(prefix)]
    theirs = [t[len(prefix):] for t in cfg.eval.tasks if t.startswith(prefix)]
    suites = []
    try:
        if ours:
            suites.append(EvalSuite(model, tokenizer, [parse_task(t) for t in ours], k=cfg.eval.k,
                                    max_examples=cfg.eval.max_examples, cache_dir=cfg.data.cache_dir))
        if theirs:
            from flacuna_jax.lm_eval import LmEvalSuite, generation_eos_ids

            suites.append(LmEvalSuite(model, tokenizer, theirs, generation_eos_ids(cfg.model.path, model.config.eos_token_id),
                                      include_path=cfg.eval.lm_eval_include_path, limit=cfg.eval.max_examples,
                                      num_fewshot=cfg.eval.k))
    except (EvalInputError, OSError, ValueError) as e:
        raise ConfigError(f"config key 'eval.tasks': {e}") from None
    return lambda params: {k: v for suite in suites for k, v in suite(params).items()}


@dataclasses.dataclass
class Session:
    """Everything a run needs, set up and checked before its first step."""
    cfg: Config
    say: Callable[[str], None]
    feed: DataFeed
    frozen: Any
    train_fn: Any
    ckpt: Checkpointer
    log: MetricsLogger
    evaluate: Callable[[Any], dict]  # TrainState -> eval metrics
    spec: dict
    start: int
    total_steps: int
    mfu_per_s: float | None  # model FLOPs of a step / (peak FLOP/s x devices)


def _write_config(out: Any, cfg: Config) -> None:
    text = dump_config(cfg)
    cfg_file = out / "config.yaml"
    if cfg_file.is_file() and cfg_file.read_text() != text:
        print(f"note: {cfg_file} differs from this config; it is replaced (the checkpoints keep their spec)", flush=True)
    write_text_atomic(cfg_file, text)


def setup(cfg: Config) -> tuple[Session, Any]:
    """(Session, TrainState): the model, data, compiled step and restored or fresh state, all checked;
    `output_dir/config.yaml` is written last, when nothing was refused."""
    main = jax.process_index() == 0
    out = run_path(cfg.output_dir)  # a local dir or a bucket (gs://...): storage.py
    say = (lambda s: print(distributed.log_prefix() + s, flush=True)) if main else (lambda s: None)
    if main:
        print("resolved config:\n" + dump_config(cfg), flush=True)
    spec = run_spec(cfg)
    previous = latest_complete_step(out)
    if previous is not None:  # before anything is loaded or compiled: refuse at once
        check_resume(stored_spec(checkpoint_dir(out), previous), cfg, str(out))

    mesh = make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    accum = batch_layout(cfg, mesh)
    say(f"mesh data={mesh.shape['data']} fsdp={mesh.shape['fsdp']} tensor={mesh.shape['tensor']} on "
        f"{jax.device_count()} {jax.devices()[0].device_kind} device(s); global batch {cfg.train.global_batch_size} = "
        f"{cfg.train.per_device_batch_size} per device x {mesh.shape['data'] * mesh.shape['fsdp']} x {accum} accumulation")
    feed = DataFeed(cfg, mesh)  # before the model: bad data stops the run at once
    say(feed.describe())
    model, frozen, trainable, p_shapes, p_shard = build_model(cfg, mesh)
    n_train, n_total = count_params(model, cfg.finetune)
    say(f"parameters: trainable {n_train:,} / total {n_total:,} ({100 * n_train / n_total:.4f}%)")

    from flacuna_jax.optim import make_optimizer
    tx, schedule = make_optimizer(cfg.optim, feed.total_steps)
    s_shard = state_shardings(mesh, tx, p_shapes, p_shard)
    target = abstract_state(tx, p_shapes, s_shard)
    f_shard = jax.tree.map(lambda x: x.sharding, frozen)
    train_fn = compile_train_step(cfg, configured_train_step(cfg, model, tx, schedule, mesh, s_shard, f_shard, accum),
                                  target, frozen, mesh, say)  # from shapes: before any state is allocated
    ckpt = Checkpointer(out, keep=cfg.checkpoint.keep)
    latest = ckpt.latest_step()
    if latest is not None:
        del trainable  # replaced by the checkpoint's
        state, data_state = ckpt.restore(latest, target)
        feed.set_state(data_state)
        say(f"resuming from checkpoint step {latest} in {ckpt.directory}")
    else:
        state = jax.jit(lambda p: init_train_state(p, tx, cfg.seed), out_shardings=s_shard,
                        donate_argnums=(0,))(trainable)
        del trainable
    start = int(jax.device_get(state.step))
    if main:
        _write_config(out, cfg)

    eval_fn = make_eval_step(model, mesh, p_shard, f_shard, loss_chunk=cfg.train.loss_chunk) if feed.has_eval else None
    suite = eval_suite(cfg, model, feed.tokenizer) if cfg.eval.tasks else None
    # The suite runs on the sharded training weights: a splash kernel (a Mosaic call, which XLA cannot
    # partition by itself) must see the mesh to run under shard_map.
    splash = cfg.model.attention in ("splash", "auto")
    def kernel_mesh():
        return jax.sharding.use_abstract_mesh(mesh.abstract_mesh) if splash else contextlib.nullcontext()

    def evaluate(state: Any) -> dict:
        metrics = {}
        if eval_fn is not None:
            total = count = 0.0
            for batch in feed.eval_batches():
                s, n = jax.device_get(eval_fn(state.params, frozen, batch))
                total, count = total + float(s), count + float(n)
            metrics["eval_loss"] = total / max(count, 1.0)
        if suite is not None:  # the multiple-choice tasks, scored by the eval CLI's own code
            with kernel_mesh():
                metrics.update({f"eval/{k}": v for k, v in suite(merge_params(state.params, frozen)).items()})
        return metrics

    peak = peak_flops(jax.devices()[0].device_kind, cfg.model.compute_dtype)
    step_flops = flops_per_token(model.config, cfg.train.seq_len, cfg.finetune) * cfg.train.global_batch_size * \
        cfg.train.seq_len
    log = MetricsLogger(out, feed.total_steps, start, enabled=main, tensorboard=cfg.log.tensorboard)
    session = Session(cfg, say, feed, frozen, train_fn, ckpt, log, evaluate if eval_fn or suite else None, spec,
                      start, feed.total_steps, step_flops / (peak * jax.device_count()) if peak else None)
    return session, state


def train_loop(s: Session, state: Any, watch: PreemptionWatch) -> tuple[int, dict, bool]:
    """The recipe: for each step, batch -> step -> log -> maybe eval -> maybe save; after a step at which
    `watch` says stop, save it and return. (last step, last line, whether it stopped early)"""
    cfg, step, last = s.cfg, s.start, {}
    tokens_per_step = cfg.train.global_batch_size * cfg.train.seq_len
    batch = s.feed.next_batch() if step < s.total_steps else None
    t_prev = time.perf_counter()
    while step < s.total_steps:
        if batch is None:  # the plan is exact and the same on every process: a bug, not a data condition
            raise RuntimeError(f"the data ended after {step} of {s.total_steps} planned steps")
        data_state = s.feed.get_state()  # after exactly step + 1 batches
        state, m = s.train_fn(state, s.frozen, batch)
        step += 1
        batch = s.feed.next_batch() if step < s.total_steps else None  # read while the device runs the step
        m = jax.device_get(m)
        now = time.perf_counter()
        dt, t_prev = now - t_prev, now
        # The same answer on every process (after the last step there is nothing left to stop).
        stopping = step < s.total_steps and watch.reached(step - s.start)
        if too_many_nonfinite(m, cfg.train.max_nonfinite_steps):
            raise nonfinite_error(m, cfg.train.max_nonfinite_steps, step, s.ckpt.directory, s.ckpt.latest_step())
        s.log.step(step, float(m["loss"]), tokens_per_step / dt)
        evaluating = is_eval_step(step, cfg.eval.every, s.total_steps, s.evaluate is not None)
        if evaluating and stopping:  # the grace period is for the checkpoint, not an evaluation
            s.say(f"step {step}: evaluation skipped (stopping for SIGTERM)")
            evaluating = False
        if is_log_step(step, cfg.log.every, s.total_steps, evaluating):
            rec = step_record(step, m, dt, tokens_per_step, s.mfu_per_s)
            if evaluating:
                rec.update(s.evaluate(state))
                t_prev = time.perf_counter()
            rec.update(s.feed.counters(data_state))
            s.log.log(rec)  # written (fsync) before this step's checkpoint can exist: a resume never loses a line
            last = rec
        if stopping or is_save_step(step, cfg.checkpoint.every, s.total_steps):
            s.ckpt.save(step, state, data_state, s.spec)
        if stopping:
            return step, last, True
    return step, last, False


def run(cfg: Config) -> dict:
    """Trains per `cfg`; returns a summary (`preempted`: stopped by SIGTERM after `steps`, that step saved).
    Raises NonFiniteError after too many skipped updates."""
    session, state = setup(cfg)
    with PreemptionWatch() as watch:  # SIGTERM from here on: saved at a step boundary
        if session.start >= session.total_steps:
            session.say(f"already at step {session.start} of {session.total_steps}: nothing to train")
        else:
            session.say(watch.describe())
        try:
            step, last, preempted = train_loop(session, state, watch)
        finally:
            session.ckpt.close()  # waits for the async saves in flight: never exit before they are complete
            session.log.close()
    if preempted:  # every process says so: each host's log tells why it stopped
        print(f"{distributed.log_prefix()}stopped by SIGTERM after step {step} of {session.total_steps}: checkpoint "
              f"{step} saved in {session.ckpt.directory}; re-run the same command to resume (exit code "
              f"{EXIT_PREEMPTED})", flush=True)
        return {"steps": step, "last": last, "total_steps": session.total_steps, "preempted": True}
    summary = ", ".join(f"{k} {last[k]:.4f}" for k in ("loss", "eval_loss") if k in last)
    session.say(f"done: {step} steps{'; ' + summary if summary else ''}; checkpoints in {session.ckpt.directory}")
    return {"steps": step, "last": last, "total_steps": session.total_steps, "preempted": False}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m flacuna_jax.train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="common keys: output_dir, seed, model.path, model.compute_dtype, model.remat, data.sources, "
               "data.packing, train.steps, train.seq_len, train.global_batch_size, train.per_device_batch_size, "
               "optim.lr, optim.warmup_steps, optim.schedule, finetune (lora|full), lora.rank, lora.targets, "
               "mesh.data, mesh.fsdp, mesh.tensor (-1 fills the rest), checkpoint.every, checkpoint.keep, "
               "log.every, eval.every. See flacuna_jax/config.py for all keys and defaults.")
    p.add_argument("--config", help="YAML config file (configs/*.yaml); omitted: the defaults")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, value parsed as YAML")
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    distributed.initialize()
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None
    from flacuna_jax.data import DataError
    from flacuna_jax.hf import CheckpointError
    from flacuna_jax.tokenizer import TokenizerError
    try:
        summary = run(cfg)
    except (ConfigError, DataError, CheckpointError, TokenizerError) as e:
        raise SystemExit(f"error: {e}") from None
    except NonFiniteError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_NONFINITE) from None
    if summary["preempted"]:
        raise SystemExit(EXIT_PREEMPTED)


if __name__ == "__main__":
    main()
