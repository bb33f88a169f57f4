"""Fine-tune a LLaMA-family model on FLAN-Mini (LoRA or full), sharded over a device mesh.

    python -m flacuna_jax.train --config configs/demo.yaml [key=value ...]
    python -m flacuna_jax.train --config configs/flacuna_13b.yaml output_dir=runs/flacuna train.steps=100

Overrides are `key=value` with the value parsed as YAML (`lora.targets='[q_proj, k_proj]'`).
The resolved config is printed and saved to `output_dir/config.yaml`. Re-running the same command
with the same output_dir resumes from the latest checkpoint there (step, trainable params,
optimizer state, RNG and the data iterator), so the result equals an uninterrupted run.

The loss is the mean token cross-entropy over ALL trained (assistant-answer) tokens of the global
batch (not a mean of per-example means). Global batch = per_device_batch_size x (mesh.data x
mesh.fsdp) x gradient-accumulation steps. Non-finite updates are skipped and counted;
train.max_nonfinite_steps of them in a row stop the run (exit code 3), the last checkpoint intact.

Writes into output_dir: config.yaml, metrics.jsonl (one line per log.every steps), tensorboard/,
checkpoints/<step>/ (never the frozen base). Export with `python -m flacuna_jax.convert export`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flacuna_jax import distributed
from flacuna_jax.checkpoint import Checkpointer
from flacuna_jax.config import Config, ConfigError, dump_config, load_config
from flacuna_jax.lora import count_params, init_lora_params, merge_params, split_params
from flacuna_jax.metrics import MetricsLogger, flops_per_token, peak_flops
from flacuna_jax.model import LoraSpec, Runtime, abstract_params
from flacuna_jax.plan import device_memory
from flacuna_jax.sharding import make_mesh, tree_shardings
from flacuna_jax.step import abstract_batch, make_eval_step, make_train_step
from flacuna_jax.train_state import abstract_state, init_train_state, state_shardings
from flacuna_jax.train_data import DataFeed

EXIT_NONFINITE = 3
# Test hook for the crash/resume tests: sleep this long after every step (never set in real runs).
_STEP_SLEEP_S = float(os.environ.get("FLACUNA_TEST_STEP_SLEEP_S", "0") or 0)


class NonFiniteError(RuntimeError):
    pass


def batch_layout(cfg: Config, mesh: jax.sharding.Mesh) -> tuple[int, int]:
    """(accumulation steps, rows per host per step): global = per_device x (data x fsdp) x accum."""
    batch_devices = mesh.shape["data"] * mesh.shape["fsdp"]
    micro = cfg.train.per_device_batch_size * batch_devices
    if cfg.train.global_batch_size % micro:
        raise ConfigError(f"config key 'train.global_batch_size': {cfg.train.global_batch_size} is not a multiple of "
                          f"per_device_batch_size x data x fsdp = {cfg.train.per_device_batch_size} x {batch_devices}")
    if cfg.train.global_batch_size % jax.process_count():
        raise ConfigError(f"config key 'train.global_batch_size': not divisible by {jax.process_count()} processes")
    return cfg.train.global_batch_size // micro, cfg.train.global_batch_size // jax.process_count()


def model_options(cfg: Config) -> tuple[Runtime, LoraSpec | None]:
    """(Runtime, LoraSpec or None for finetune=full): how the config runs the model."""
    runtime = Runtime(jnp.dtype(cfg.model.compute_dtype), jnp.dtype(cfg.model.param_dtype), cfg.model.remat,
                      cfg.model.attention, cfg.model.base_quant, cfg.model.double_quant)
    if cfg.finetune != "lora":
        return runtime, None
    return runtime, LoraSpec(cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout, tuple(cfg.lora.targets))


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
    """(model, frozen, trainable, trainable shapes, trainable shardings) on the mesh."""
    from flacuna_jax.hf import load_pretrained

    if not cfg.model.path:
        raise ConfigError("config key 'model.path': required (a local Hugging Face LLaMA directory)")
    runtime, lora = model_options(cfg)
    model, base = load_pretrained(cfg.model.path, runtime, lora, mesh)
    shapes, names = abstract_params(model)
    p_shapes, p_names = split_params(shapes, cfg.finetune)[0], split_params(names, cfg.finetune)[0]
    p_shard = tree_shardings(mesh, p_names, p_shapes)
    if cfg.finetune == "lora" and cfg.lora.init_from:
        trainable, frozen = adapter_params(cfg, model, p_shapes, p_shard), base
    elif cfg.finetune == "lora":
        trainable, frozen = init_lora_params(model, jax.random.PRNGKey(cfg.seed), p_shard), base
    else:
        trainable, frozen = split_params(base, "full")
    return model, frozen, trainable, p_shapes, p_shard


def configured_train_step(cfg: Config, model: Any, tx: Any, schedule: Any, mesh: Any, state_sh: Any, frozen_sh: Any,
                          accum: int) -> Any:
    """The jitted train step `cfg` asks for (loss chunking, LoRA dropout): training, the planner and
    the benchmarks all compile this one."""
    return make_train_step(model, tx, schedule, mesh, state_sh, frozen_sh, accum=accum, loss_chunk=cfg.train.loss_chunk,
                           dropout=cfg.finetune == "lora" and cfg.lora.dropout > 0)


def compile_train_step(cfg: Config, step: Any, state: Any, frozen: Any, mesh: Any, say: Any) -> Any:
    """The step compiled before the first batch: its exact per-device memory is reported up front, and
    a batch of another shape, dtype or sharding is an error instead of a silent recompile."""
    t0 = time.perf_counter()
    batch = abstract_batch(cfg.train.global_batch_size, cfg.train.seq_len, mesh)
    compiled = step.lower(state, frozen, batch).compile()
    m = device_memory(compiled, state, frozen, batch)
    gib = lambda n: f"{n / 2**30:.3f} GiB"
    say(f"train step compiled in {time.perf_counter() - t0:.1f}s; per-device memory: params {gib(m['params'])} "
        f"(frozen base + trainable), optimizer {gib(m['optimizer'])}, temporaries {gib(m['temp'])}, batch "
        f"{gib(m['batch'])} -> {gib(m['total'])}")
    return compiled


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


def run(cfg: Config) -> dict:
    """Trains per `cfg`; returns a summary. Raises NonFiniteError after too many skipped updates."""
    main = jax.process_index() == 0
    out = Path(cfg.output_dir)
    say = (lambda s: print(distributed.log_prefix() + s, flush=True)) if main else (lambda s: None)
    if main:
        out.mkdir(parents=True, exist_ok=True)
        text = dump_config(cfg)
        print("resolved config:\n" + text, flush=True)
        cfg_file = out / "config.yaml"
        if cfg_file.is_file() and cfg_file.read_text() != text:
            print(f"note: {cfg_file} differs from this config; it is replaced (a resume continues with the new values)",
                  flush=True)
        (out / "config.yaml.tmp").write_text(text)
        (out / "config.yaml.tmp").replace(out / "config.yaml")

    mesh = make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    accum, host_rows = batch_layout(cfg, mesh)
    say(f"mesh data={mesh.shape['data']} fsdp={mesh.shape['fsdp']} tensor={mesh.shape['tensor']} on "
        f"{jax.device_count()} {jax.devices()[0].device_kind} device(s); global batch {cfg.train.global_batch_size} = "
        f"{cfg.train.per_device_batch_size} per device x {mesh.shape['data'] * mesh.shape['fsdp']} x {accum} accumulation")

    model, frozen, trainable, p_shapes, p_shard = build_model(cfg, mesh)
    n_train, n_total = count_params(model, cfg.finetune)
    say(f"parameters: trainable {n_train:,} / total {n_total:,} ({100 * n_train / n_total:.4f}%)")

    feed = DataFeed(cfg, host_rows, mesh)
    total_steps = feed.total_steps
    say(feed.describe())

    from flacuna_jax.optim import make_optimizer
    tx, schedule = make_optimizer(cfg.optim, total_steps)
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
        feed.set_host_states(data_state)
        say(f"resuming from checkpoint step {latest} in {ckpt.directory}")
    else:
        state = jax.jit(lambda p: init_train_state(p, tx, cfg.seed), out_shardings=s_shard,
                        donate_argnums=(0,))(trainable)
        del trainable
    start = int(jax.device_get(state.step))

    eval_fn = make_eval_step(model, mesh, p_shard, f_shard, loss_chunk=cfg.train.loss_chunk) if feed.has_eval else None
    suite = eval_suite(cfg, model, feed.tokenizer) if cfg.eval.tasks else None
    peak = peak_flops(jax.devices()[0].device_kind, cfg.model.compute_dtype)
    step_flops = flops_per_token(model.config, cfg.train.seq_len, cfg.finetune) * cfg.train.global_batch_size * cfg.train.seq_len
    log = MetricsLogger(out, total_steps, start, enabled=main, tensorboard=cfg.log.tensorboard)
    if start >= total_steps:
        say(f"already at step {start} of {total_steps}: nothing to train")

    def evaluate() -> dict:
        metrics = {}
        if eval_fn is not None:
            total = count = 0.0
            for batch in feed.eval_batches():
                s, n = jax.device_get(eval_fn(state.params, frozen, batch))
                total, count = total + float(s), count + float(n)
            metrics["eval_loss"] = total / max(count, 1.0)
        if suite is not None:  # the multiple-choice tasks, scored by the eval CLI's own code
            metrics.update({f"eval/{k}": v for k, v in suite(merge_params(state.params, frozen)).items()})
        return metrics

    last = {}
    saved = latest or 0
    t_prev = time.perf_counter()
    step = start
    try:
        batch = feed.next_batch() if start < total_steps else None
        for step in range(start, total_steps):
            if batch is None:
                say(f"data exhausted after {step} steps (end of the training split)")
                break
            save = (step + 1) % cfg.checkpoint.every == 0 or step + 1 == total_steps
            data_state = feed.get_state()  # after exactly step + 1 batches
            state, m = train_fn(state, frozen, batch)
            # The next batch is read while the device runs this step (dispatch is asynchronous).
            batch = feed.next_batch() if step + 1 < total_steps else None
            m = jax.device_get(m)
            now = time.perf_counter()
            dt, t_prev = now - t_prev, now
            if int(m["nonfinite_run"]) >= cfg.train.max_nonfinite_steps:
                raise NonFiniteError(
                    f"stopping: {int(m['nonfinite_run'])} consecutive steps (up to step {step + 1}) had a non-finite "
                    f"loss or gradient (train.max_nonfinite_steps={cfg.train.max_nonfinite_steps}); their updates were "
                    f"skipped. The last good checkpoint is in {ckpt.directory} (step {ckpt.latest_step()}). Lower "
                    f"optim.lr, check the data, or use model.compute_dtype=float32.")
            tps = cfg.train.global_batch_size * cfg.train.seq_len / dt
            log.step(step + 1, float(m["loss"]), tps)
            do_eval = (eval_fn is not None or suite is not None) and (
                (cfg.eval.every and (step + 1) % cfg.eval.every == 0) or step + 1 == total_steps)
            if (step + 1) % cfg.log.every == 0 or step + 1 in (1, total_steps) or do_eval:
                rec = {"step": step + 1, "loss": float(m["loss"]), "lr": float(m["lr"]),
                       "grad_norm": float(m["grad_norm"]), "tokens": int(m["tokens"]), "tokens_per_s": tps,
                       "step_time_s": dt, "skipped_steps": int(m["skipped_steps"])}
                if peak:
                    rec["mfu"] = step_flops / dt / (peak * jax.device_count())
                if do_eval:
                    rec.update(evaluate())
                    t_prev = time.perf_counter()
                rec.update(feed.counters(data_state))
                log.log(rec)  # written (fsync) before this step's checkpoint can exist: a resume never loses a line
                last = rec
            if save:
                ckpt.save(step + 1, state, feed.all_host_states(data_state))
                saved = step + 1
            if _STEP_SLEEP_S:
                time.sleep(_STEP_SLEEP_S)
        else:
            step = total_steps
        if step > saved:  # the data ran out before train.steps
            ckpt.save(step, state, feed.all_host_states(feed.get_state()))
    finally:
        ckpt.close()  # waits for the async saves in flight: never exit before they are complete
        log.close()
    summary = ", ".join(f"{k} {last[k]:.4f}" for k in ("loss", "eval_loss") if k in last)
    say(f"done: {step} steps{'; ' + summary if summary else ''}; checkpoints in {ckpt.directory}")
    return {"steps": step, "last": last, "total_steps": total_steps}


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
        run(cfg)
    except (ConfigError, DataError, CheckpointError, TokenizerError) as e:
        raise SystemExit(f"error: {e}") from None
    except NonFiniteError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_NONFINITE) from None


if __name__ == "__main__":
    main()
