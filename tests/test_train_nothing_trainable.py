"""The training entry point over data that yields nothing trainable stops at once with one line naming
the source and the counts (it used to loop forever in the packer), for the training and the held-out split."""

import json

import pytest

from flacuna_jax import train
from flacuna_jax.config import load_config
from flacuna_jax.data import DataError, split_indices


def write_records(path, long_ids, n):
    """n records; those in `long_ids` have a prompt longer than seq_len=512 (no target left)."""
    with open(path, "w") as f:
        for i in range(n):
            prompt = "word " * 300 if i in long_ids else "hi"
            f.write(json.dumps({"id": str(i), "conversations": [{"from": "human", "value": prompt},
                                                                {"from": "gpt", "value": "ok"}]}) + "\n")
    return str(path)


@pytest.mark.parametrize("split", ["train", "eval"])
def test_nothing_trainable_stops_at_once(tiny_model_dir, char_tokenizer_dir, tmp_path, split):
    if split == "train":
        data, expect = write_records(tmp_path / "d.jsonl", set(range(200)), 200), "150 records, 0 kept, 150 dropped"
    else:  # a trainable training split, but every held-out record is too long to train on
        held_out = set(split_indices(40, 0.25, 0)[1].tolist())
        data, expect = write_records(tmp_path / "d.jsonl", held_out, 40), "10 records, 0 kept, 10 dropped"
    cfg = load_config(None, [f"output_dir={tmp_path / 'run'}", f"model.path={tiny_model_dir('mha')}",
                             f"tokenizer.path={char_tokenizer_dir}", f"data.sources=[{data}]", "train.seq_len=512",
                             "train.steps=8", "train.global_batch_size=8", "train.per_device_batch_size=1",
                             "data.eval_fraction=0.25", f"data.cache_dir={tmp_path / 'cache'}"])
    with pytest.raises(DataError) as e:
        train.run(cfg)
    msg = str(e.value)
    assert "\n" not in msg and data in msg and f"the {split} split yields nothing trainable" in msg, msg
    assert expect in msg, msg
    assert not (tmp_path / "run" / "config.yaml").exists()
