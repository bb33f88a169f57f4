"""A built FLAN-Mini (scaled down) passes ``data stats`` and trains through ``train`` unchanged."""

import json
from pathlib import Path

import numpy as np

from flacuna_jax import train
from flacuna_jax.config import load_config
from flacuna_jax.data.cli import main as data_main
from flacuna_jax.data.flan_mini import build, load_recipe
from tests import flan_mini_sources as fx

ROOT = Path(__file__).resolve().parents[1]


def test_built_file_passes_data_stats_and_trains(tmp_path, tiny_model_dir, char_tokenizer_dir, capsys):
    paths = fx.write_sources(tmp_path / "src", 60)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(fx.local_recipe(str(ROOT / "configs/flan_mini.yaml"), paths))
    out = tmp_path / "flan_mini"
    card = build(load_recipe(str(recipe)), str(out), scale=1e-4, cache_dir=str(tmp_path / "cache"),
                 tokenizer=str(char_tokenizer_dir), zip_output=True)
    data = out / "flan_mini.json.zip"
    model = tiny_model_dir("mha")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"seed: 0\nmodel: {{path: {model}}}\ntokenizer: {{path: {char_tokenizer_dir}}}\n"
                   f"data: {{sources: [{data}], cache_dir: {tmp_path / 'cache'}, eval_fraction: 0.0}}\n"
                   "train: {seq_len: 4096}\n")
    capsys.readouterr()
    assert data_main(["stats", "--config", str(cfg)]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["records"] == 134 and stats["skipped_bad_records"] == 0 and stats["truncated"] == 0
    # the card's token lengths are what training encodes
    assert stats["tokens"] == card["tokens"]["total"] and card["tokens"]["max"] <= 4096

    run = tmp_path / "run"
    cfg = load_config(ROOT / "configs/demo.yaml", [
        f"output_dir={run}", f"model.path={model}", f"tokenizer.path={char_tokenizer_dir}",
        "model.compute_dtype=float32", "model.param_dtype=float32", "model.remat=none",
        f"data.sources=[{data}]", f"data.cache_dir={tmp_path / 'cache'}", "data.eval_fraction=0.0",
        "train.steps=2", "train.seq_len=512", "train.global_batch_size=8", "train.per_device_batch_size=1",
        "train.loss_chunk=0", "lora.rank=4", "lora.targets=[q_proj, v_proj]", "optim.warmup_steps=1",
        "checkpoint.every=2", "log.every=1", "log.tensorboard=false", "eval.every=0", "mesh.fsdp=1", "mesh.data=8"])
    summary = train.run(cfg)
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert summary["steps"] == 2 and len(losses) == 2 and np.isfinite(losses).all()
