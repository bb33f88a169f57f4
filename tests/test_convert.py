"""`python -m flacuna_jax.convert`: a saved training run exported as a PEFT adapter and as a merged
dir (loaded by PEFT / transformers and compared with the JAX model), full fine-tuning, errors, --help."""

import json
import subprocess
import sys

import jax
import numpy as np
import pytest

from flacuna_jax import checkpoint, convert, hf, lora, optim, train_state
from flacuna_jax.config import Config, ConfigError, LoraConfig, ModelConfig, OptimConfig, dump_config
from flacuna_jax.model import LoraSpec
from tests.helpers import hf_logits, hf_reference
from tests.test_peft import random_factors

LOGIT_TOL = 1e-4


def _save_run(run_dir, cfg, trainable, step=3):
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    tx, _ = optim.make_optimizer(OptimConfig(), 10)
    ck = checkpoint.Checkpointer(run_dir)
    ck.save(step, train_state.init_train_state(jax.tree.map(jax.numpy.asarray, trainable), tx, 0), {})
    ck.close()
    return run_dir


@pytest.fixture(scope="module")
def lora_run(tiny_model_dir, tmp_path_factory):
    base_dir = tiny_model_dir("gqa")
    targets = ("q_proj", "k_proj", "gate_proj")
    cfg = Config(model=ModelConfig(path=str(base_dir)), lora=LoraConfig(rank=4, alpha=8.0, dropout=0.1, targets=targets))
    config = hf.load_hf_config(base_dir)
    factors = random_factors(config, LoraSpec(4, 8.0, 0.0, targets), seed=11)
    return _save_run(tmp_path_factory.mktemp("run"), cfg, factors), factors


def test_export_peft_and_merged_from_a_run(lora_run, tiny_model_dir, tmp_path):
    from peft import PeftModel

    run_dir, factors = lora_run
    base_dir = tiny_model_dir("gqa")
    convert.main(["export", "--run", str(run_dir), "--out", str(tmp_path / "adapter"), "--format", "peft"])
    convert.main(["export", "--run", str(run_dir), "--step", "3", "--out", str(tmp_path / "merged"),
                  "--format", "merged", "--max-shard-size", "50KB"])
    raw = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (raw["r"], raw["lora_alpha"], raw["lora_dropout"]) == (4, 8, 0.1)
    assert raw["base_model_name_or_path"] == str(base_dir)
    assert (tmp_path / "merged" / "model.safetensors.index.json").is_file()

    spec = LoraSpec(4, 8.0, 0.0, ("q_proj", "k_proj", "gate_proj"))
    model, base = hf.load_pretrained(base_dir, lora=spec)
    ids = np.random.default_rng(2).integers(0, model.config.vocab_size, (2, 10)).astype(np.int32)
    ours = np.asarray(model.apply({"params": lora.merge_params(factors, base)}, ids))
    merged = hf_logits(hf_reference(tmp_path / "merged"), ids)
    peft = hf_logits(PeftModel.from_pretrained(hf_reference(base_dir), str(tmp_path / "adapter")), ids)
    np.testing.assert_allclose(merged, ours, atol=LOGIT_TOL, rtol=0)
    np.testing.assert_allclose(peft, ours, atol=LOGIT_TOL, rtol=0)

    convert.main(["merge", "--model", str(base_dir), "--adapter", str(tmp_path / "adapter"),
                  "--out", str(tmp_path / "remerged"), "--max-shard-size", "50KB"])
    a, b = hf.TensorSource(tmp_path / "merged"), hf.TensorSource(tmp_path / "remerged")
    assert sorted(a.names()) == sorted(b.names())
    for name in a.names():
        assert np.asarray(a.get(name)).tobytes() == np.asarray(b.get(name)).tobytes(), name


def test_full_finetune_run(tiny_model_dir, tmp_path):
    base_dir = tiny_model_dir("mha")
    _, params = hf.load_pretrained(base_dir)
    trained = jax.tree.map(lambda x: np.asarray(x) * 1.5, lora.split_params(params, "full")[0])
    run_dir = _save_run(tmp_path / "run", Config(finetune="full", model=ModelConfig(path=str(base_dir))), trained)
    with pytest.raises(SystemExit, match="finetune=full run has no LoRA adapter; use --format merged"):
        convert.main(["export", "--run", str(run_dir), "--out", str(tmp_path / "a"), "--format", "peft"])
    convert.main(["export", "--run", str(run_dir), "--out", str(tmp_path / "m"), "--format", "merged",
                  "--dtype", "bfloat16"])
    src = hf.TensorSource(tmp_path / "m")
    want = dict(hf.iter_hf_tensors(trained, hf.load_hf_config(base_dir), np.float32))
    assert sorted(src.names()) == sorted(want)
    for name, t in want.items():
        np.testing.assert_array_equal(np.asarray(src.get(name), np.float32),
                                      t.astype(src.get(name).dtype).astype(np.float32))


def test_cli_errors_are_one_line(tmp_path, lora_run):
    run_dir, _ = lora_run
    for argv in (["export", "--run", str(tmp_path / "none"), "--out", str(tmp_path / "o"), "--format", "peft"],
                 ["export", "--run", str(run_dir), "--step", "99", "--out", str(tmp_path / "o"), "--format", "merged"],
                 ["merge", "--model", str(tmp_path), "--adapter", str(tmp_path), "--out", str(tmp_path / "o")]):
        with pytest.raises(SystemExit) as e:
            convert.main(argv)
        assert str(e.value).startswith("error:") and "\n" not in str(e.value), str(e.value)
    assert "no checkpoint at step 99" in str(_exit(["export", "--run", str(run_dir), "--step", "99",
                                                    "--out", str(tmp_path / "o"), "--format", "merged"]))


def _exit(argv):
    with pytest.raises(SystemExit) as e:
        convert.main(argv)
    return e.value


def test_help_lists_subcommands_with_examples():
    out = subprocess.run([sys.executable, "-m", "flacuna_jax.convert", "--help"], capture_output=True, text=True,
                         check=True).stdout
    assert "export" in out and "merge" in out
    assert "convert export --run runs/demo --out build/demo/adapter --format peft" in out
    assert "convert merge --model" in out


def test_training_starts_from_an_exported_adapter(lora_run, tiny_model_dir, tmp_path):
    """lora.init_from: train.build_model seeds the factors from a PEFT dir (here: one we exported)."""
    from flacuna_jax import train
    from flacuna_jax.config import load_config
    from flacuna_jax.sharding import make_mesh

    run_dir, factors = lora_run
    convert.main(["export", "--run", str(run_dir), "--out", str(tmp_path / "adapter"), "--format", "peft"])
    cfg = load_config(run_dir / "config.yaml", [f"lora.init_from={tmp_path / 'adapter'}"])
    _, _, trainable, _, _ = train.build_model(cfg, make_mesh(fsdp=-1))
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(trainable), factors)
    # Targets are compared as a set; a different alpha (the scale alpha/r) is refused, naming the key.
    targets = list(reversed(cfg.lora.targets))
    reordered = load_config(run_dir / "config.yaml", [f"lora.init_from={tmp_path / 'adapter'}", f"lora.targets={targets}"])
    _, _, again, _, _ = train.build_model(reordered, make_mesh(fsdp=-1))
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(again), factors)
    other_alpha = load_config(run_dir / "config.yaml", [f"lora.init_from={tmp_path / 'adapter'}",
                                                        f"lora.alpha={2 * cfg.lora.alpha}"])
    with pytest.raises(ConfigError, match="lora.init_from.*alpha"):
        train.build_model(other_alpha, make_mesh(fsdp=-1))
