"""A run keeps its identity: the checkpoint stores what defines it, a resume that changes it is refused
(naming the keys) before anything is loaded or config.yaml rewritten, and export reads the stored spec."""

import jax
import pytest

from flacuna_jax import checkpoint, optim, train, train_state
from flacuna_jax.config import ConfigError, OptimConfig, dump_config, load_config
from flacuna_jax.run_spec import check_resume, run_spec


def saved_run(run_dir, overrides):
    cfg = load_config(None, [f"output_dir={run_dir}", *overrides])
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    tx, _ = optim.make_optimizer(OptimConfig(), 10)
    ck = checkpoint.Checkpointer(run_dir)
    ck.save(2, train_state.init_train_state({"w": jax.numpy.ones(3)}, tx, 0), {"next": 0}, spec=run_spec(cfg))
    ck.close()
    return cfg


BASE = ["model.path=/models/base", "lora.alpha=16", "lora.targets=[q_proj, v_proj]", "data.sources=[a.json]"]


def test_a_resume_with_other_defining_keys_is_refused_before_anything_else(tmp_path):
    saved_run(tmp_path, BASE)
    before = (tmp_path / "config.yaml").read_text()
    changed = load_config(None, [f"output_dir={tmp_path}", *BASE, "lora.alpha=32", "seed=1"])
    with pytest.raises(ConfigError) as e:
        train.run(changed)  # refused before the (absent) model is even looked for
    msg = str(e.value)
    assert "lora.alpha, seed" in msg and "checkpoint 16.0, config 32.0" in msg and "\n" not in msg, msg
    assert (tmp_path / "config.yaml").read_text() == before
    # Keys that do not define the checkpoint may change; LoRA targets are a set.
    fine = load_config(None, [f"output_dir={tmp_path}", *BASE, "optim.lr=1e-3", "train.steps=99", "mesh.fsdp=2",
                              "lora.targets=[v_proj, q_proj]", "train.global_batch_size=64"])
    check_resume(checkpoint.stored_spec(checkpoint.checkpoint_dir(tmp_path), 2), fine, str(tmp_path))


def test_export_reads_the_spec_stored_with_the_checkpoint(tmp_path):
    saved_run(tmp_path, BASE)
    # A later launch (even a failed one) rewrote config.yaml with another alpha and model.
    (tmp_path / "config.yaml").write_text(dump_config(load_config(None, [*BASE, "lora.alpha=64", "model.path=/x"])))
    step, params, cfg = checkpoint.load_trainable(tmp_path)
    assert step == 2 and cfg.lora.alpha == 16.0 and cfg.model.path == "/models/base"
    assert sorted(cfg.lora.targets) == ["q_proj", "v_proj"]
