"""Test set-up: 8 fake CPU devices for mesh tests, and session-wide tiny models and tokenizers."""

import os

_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = f"{_flags} --xla_force_host_platform_device_count=8".strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

from tests.helpers import write_char_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """tiny_model_dir(preset, **kw) -> path of a random HF LLaMA dir, written once per session."""
    from flacuna_jax import tiny

    made = {}

    def make(preset: str, seed: int = 1, max_shard_size: str | int = "5GB"):
        key = (preset, seed, max_shard_size)
        if key not in made:
            path = tmp_path_factory.mktemp(f"model_{preset}")
            made[key] = tiny.write_tiny_model(path, tiny.PRESETS[preset], seed=seed, max_shard_size=max_shard_size)
        return made[key]

    return make


@pytest.fixture(scope="session")
def char_tokenizer_dir(tmp_path_factory):
    return write_char_tokenizer(tmp_path_factory.mktemp("char_tokenizer"))


@pytest.fixture(scope="session")
def smollm2_dir():
    """The real SmolLM2-135M-Instruct as an HF dir (built once under .cache/smollm2); `real` tests only."""
    from benchmarks.smollm2 import smollm2_dir

    return smollm2_dir()
