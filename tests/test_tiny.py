"""Tiny random HF models: deterministic bytes, and the demo preset's scaled final norm."""

from safetensors.numpy import load_file

from flacuna_jax import tiny


def tensors(path):
    return load_file(str(path / "model.safetensors"))


def test_same_seed_same_bytes_and_final_norm_scale(tmp_path):
    base = tensors(tiny.write_tiny_model(tmp_path / "a", tiny.PRESETS["mha"], seed=3))
    again = tensors(tiny.write_tiny_model(tmp_path / "b", tiny.PRESETS["mha"], seed=3))
    scaled = tensors(tiny.write_tiny_model(tmp_path / "c", tiny.PRESETS["mha"], seed=3, final_norm_scale=10.0))
    assert base.keys() == again.keys() == scaled.keys()
    for name, t in base.items():
        assert (again[name] == t).all(), name
        if name != "model.norm.weight":
            assert (scaled[name] == t).all(), name
    ratio = scaled["model.norm.weight"] / base["model.norm.weight"]
    assert abs(ratio - 10.0).max() < 1e-5


def test_cli_scales_the_demo_preset_only_by_default(tmp_path):
    tiny.main(["--preset", "demo", "--vocab-size", "64", "--out", str(tmp_path / "demo")])
    tiny.main(["--preset", "demo", "--vocab-size", "64", "--final-norm-scale", "1", "--out", str(tmp_path / "plain")])
    tiny.main(["--preset", "mha", "--out", str(tmp_path / "mha")])
    demo, plain = tensors(tmp_path / "demo")["model.norm.weight"], tensors(tmp_path / "plain")["model.norm.weight"]
    assert abs(demo / plain - tiny.FINAL_NORM_SCALE["demo"]).max() < 1e-5
    assert abs(tensors(tmp_path / "mha")["model.norm.weight"] - 1.0).max() < 0.6  # ~N(1, 0.1), unscaled
