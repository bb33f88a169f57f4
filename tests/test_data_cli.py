"""``python -m flacuna_jax.data preview|stats`` on the demo sample."""

import json

import pytest

from flacuna_jax import templates
from flacuna_jax.data.cli import main
from tests.conftest_data import demo_dir, sample_path, sample_records, tokenizer_dir  # noqa: F401


@pytest.fixture
def cfg(tmp_path, sample_path, tokenizer_dir):
    p = tmp_path / "cfg.yaml"
    p.write_text(f"seed: 0\nmodel:\n  path: {tokenizer_dir}\n"
                 f"data:\n  sources: [{sample_path}]\n  cache_dir: {tmp_path / 'cache'}\n"
                 "train:\n  seq_len: 256\n")
    return str(p)


def test_preview_jsonl(cfg, capsys, tokenizer_dir, sample_records):
    assert main(["preview", "--config", cfg, "--num", "4", "--jsonl", "train.seq_len=512"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert len(lines) == 4
    tok = templates.SegmentTokenizer.load(tokenizer_dir)
    by_id = {r["id"]: r for r in sample_records}
    for x in lines:
        assert set(x) == {"id", "input_ids", "loss_mask"} and len(x["input_ids"]) == len(x["loss_mask"])
        assert tok.decode(x["input_ids"]) == templates.render(by_id[x["id"]]["conversations"])
        assert set(x["loss_mask"]) == {0, 1} and x["loss_mask"][-1] == 1


def test_preview_text_shows_trained_spans(cfg, capsys):
    assert main(["preview", "--config", cfg, "--num", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count("===") == 4 and "ASSISTANT:⟦ " in out and "</s>⟧" in out


def test_stats(cfg, capsys, sample_path):
    weights = f"data.sources=[{{path: {sample_path}, weight: 2}}]"
    assert main(["stats", "--config", cfg, weights]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["records"] == 3000 and s["eval_examples"] == 15
    assert s["train_examples_per_epoch"] == s["examples"] == 2985
    assert s["sources"][0]["weight"] == 2.0 and s["skipped_bad_records"] == 0
    assert 0.85 < s["efficiency_real_tokens"] <= 1 and s["padding_mode_efficiency"] < 0.5


def test_bad_source_is_a_clear_error(cfg, capsys, tmp_path):
    assert main(["stats", "--config", cfg, f"data.sources=[{tmp_path / 'missing.json'}]"]) == 2
    assert "missing.json: no such file or directory" in capsys.readouterr().err


def test_no_eval_record_is_zero_and_nothing_trainable_is_one_line(cfg, capsys, tmp_path, sample_records):
    from tests.conftest_data import write_jsonl

    few = write_jsonl(tmp_path / "few.jsonl", sample_records[:20])
    assert main(["stats", "--config", cfg, f"data.sources=[{few}]", "data.eval_fraction=0.02"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["eval_examples"] == 0 and s["examples"] == 20
    long = write_jsonl(tmp_path / "long.jsonl", [
        {"id": str(i), "conversations": [{"from": "human", "value": "word " * 300}, {"from": "gpt", "value": "ok"}]}
        for i in range(200)])
    for cmd in ("stats", "preview"):
        assert main([cmd, "--config", cfg, f"data.sources=[{long}]", "train.seq_len=64"]) == 2
        out, err = capsys.readouterr()
        assert not out and len(err.strip().splitlines()) == 1, err
        assert str(long) in err and "199 records, 0 kept, 199 dropped_no_target" in err, err
