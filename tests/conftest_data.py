"""Shared data-test fixtures (import explicitly: ``from conftest_data import *``).

Everything is generated locally by ``flacuna_jax.demo_assets``; nothing is downloaded and
nothing from ``../shared`` is used.
"""

import json

import pytest

from flacuna_jax import demo_assets


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory):
    """The full demo sample (3000 records) and its tokenizer, written once per session."""
    out = tmp_path_factory.mktemp("demo")
    demo_assets.write_demo_assets(str(out))
    return out


@pytest.fixture(scope="session")
def tokenizer_dir(demo_dir):
    return str(demo_dir / "tokenizer")


@pytest.fixture(scope="session")
def sample_path(demo_dir):
    return str(demo_dir / demo_assets.SAMPLE_NAME)


@pytest.fixture(scope="session")
def sample_records(sample_path):
    with open(sample_path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="session")
def hf_tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(tokenizer_dir)


def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return str(path)
