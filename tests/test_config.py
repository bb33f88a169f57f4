"""Config: YAML + key=value overrides, errors that name the key, a faithful dump."""

import pytest
import yaml

from flacuna_jax.config import ConfigError, DataSource, dump_config, load_config


def test_overrides_parse_as_yaml(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model: {path: m}\noptim: {lr: 1e-4}\n")
    cfg = load_config(p, ["train.steps=20", "lora.targets=[q_proj, k_proj]", "output_dir=runs/x",
                          "data.sources=[{path: a.json, weight: 2}, b.jsonl]", "optim.lr=3e-5"])
    assert cfg.train.steps == 20 and cfg.output_dir == "runs/x"
    assert cfg.lora.targets == ("q_proj", "k_proj")
    assert cfg.data.sources == (DataSource("a.json", 2.0), DataSource("b.jsonl", 1.0))
    assert cfg.optim.lr == 3e-5 and cfg.tokenizer_path == "m"


def test_dump_round_trips(tmp_path):
    cfg = load_config(None, ["seed=3", "data.sources=[x.json]", "finetune=full"])
    p = tmp_path / "out.yaml"
    p.write_text(dump_config(cfg))
    assert load_config(p) == cfg
    assert yaml.safe_load(p.read_text())["seed"] == 3


@pytest.mark.parametrize("override, key", [
    ("train.stepz=3", "train.stepz"), ("nope=1", "nope"), ("train.steps=abc", "train.steps"),
    ("optim.name=lion", "optim.name"), ("lora.targets=[q_proj, w_proj]", "lora.targets"),
    ("train.seq_len=0", "train.seq_len"), ("mesh.fsdp=-2", "mesh.fsdp"), ("lora.dropout=1.5", "lora.dropout"),
])
def test_bad_keys_and_values_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def test_missing_file_and_malformed_override(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["justakey"])


@pytest.mark.parametrize("override", [
    "train.max_nonfinite_steps=0", "lora.alpha=0", "lora.alpha=-16", "optim.lr=.nan", "optim.lr=nan",
    "optim.warmup_steps=-1", "optim.eps=0", "optim.b2=1.0", "train.loss_chunk=-1", "eval.every=-1",
    "data.num_workers=-2", "seed=-1", "train.epochs=0", "optim.clip_norm=.inf",
])
def test_every_numeric_key_has_a_range(override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"config key '{key}': must be "):
        load_config(None, [override])


def test_range_table_covers_every_numeric_key():
    import dataclasses
    import typing

    from flacuna_jax import config

    def numeric_keys(cls, prefix=""):
        for f in dataclasses.fields(cls):
            tp = typing.get_type_hints(cls)[f.name]
            inner = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
            if dataclasses.is_dataclass(inner[0]) and inner[0] is not config.DataSource:
                yield from numeric_keys(inner[0], f"{prefix}{f.name}.")
            elif inner[0] in (int, float):
                yield prefix + f.name

    keys = set(numeric_keys(config.Config))
    assert keys and keys == set(config._RANGES), keys ^ set(config._RANGES)
    load_config(None)  # the defaults pass


def test_splash_attention_and_its_block_sizes():
    from flacuna_jax.attention_splash import SplashBlocks
    from flacuna_jax.train_compile import model_options

    cfg = load_config(None, ["model.attention=splash", "model.splash.block_q=256", "model.splash.block_kv=1024",
                             "model.splash.block_kv_compute=256", "model.splash.block_q_bwd=128",
                             "model.splash.block_kv_bwd=384"])
    runtime, _ = model_options(cfg)
    assert runtime.attention == "splash" and runtime.splash_blocks == SplashBlocks(256, 1024, 256, 128, 384)
    with pytest.raises(ConfigError, match=r"'model\.splash\.block_kv': must be a positive multiple of 128, got 100"):
        load_config(None, ["model.splash.block_kv=100"])
    with pytest.raises(ConfigError, match=r"'model\.splash\.block_kv_compute': 384 does not divide "
                                          r"model\.splash\.block_kv=512"):
        load_config(None, ["model.splash.block_kv_compute=384"])
    with pytest.raises(ConfigError, match=r"'model\.attention': 'flash' is not one of xla, dot_product, splash, auto"):
        load_config(None, ["model.attention=flash"])
    from flacuna_jax import attention, config

    assert config._CHOICES["model.attention"] == attention.KERNELS  # the kernels attention.attend knows


def test_tpu_config_is_the_paper_recipe_with_splash_and_a_bucket():
    from pathlib import Path

    from flacuna_jax.config import to_dict

    root = Path(__file__).resolve().parents[1]
    paper, tpu = (to_dict(load_config(root / f"configs/{name}.yaml")) for name in ("flacuna_13b", "flacuna_13b_tpu"))
    assert tpu["model"].pop("attention") == "splash" and paper["model"].pop("attention") == "dot_product"
    assert tpu.pop("output_dir").startswith("gs://") and paper.pop("output_dir") == "runs/flacuna_13b"
    assert tpu == paper
