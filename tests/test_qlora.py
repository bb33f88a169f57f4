"""A quantized frozen base (model.base_quant): parity with transformers + bitsandbytes and PEFT, sharding,
loading, training, inference with LoRA on top, export.

The references are transformers' fp32 LLaMA holding bitsandbytes' own quantize -> dequantize round trip
of every decoder linear (tests/bnb_reference.py), not bitsandbytes' Linear4bit forward: bitsandbytes
0.50.2 runs that forward in bfloat16 on CPUs with AVX512-BF16 (backends/cpu/ops.py, the fused
gemv_4bit kernel), and in fp32 (dequantize_4bit + linear, the same numbers as the round trip) elsewhere.
The tolerances are those of an fp32 computation, on every CPU."""

import copy
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("bitsandbytes")

from flacuna_jax import quant  # noqa: E402
from flacuna_jax.hf import load_pretrained  # noqa: E402
from flacuna_jax.lora import init_lora_params, merge_params, split_params  # noqa: E402
from flacuna_jax.model import LoraSpec, Runtime, abstract_params  # noqa: E402
from flacuna_jax.sharding import make_mesh  # noqa: E402
from tests.bnb_reference import quantized_reference  # noqa: E402

IDS = np.array([[1, 17, 40, 3, 99, 5, 250, 7, 64, 2, 11, 13], [1, 200, 8, 8, 31, 77, 6, 150, 9, 90, 4, 12]])
LORA = LoraSpec(rank=4, alpha=8.0, dropout=0.0, targets=("q_proj", "v_proj", "down_proj"))


def _log_probs(logits, ids):
    lp = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1)
    return np.asarray(jnp.take_along_axis(lp[:, :-1], jnp.asarray(ids)[:, 1:, None], axis=-1)[..., 0])


@pytest.fixture(scope="module")
def mha_dir(tiny_model_dir):
    return tiny_model_dir("mha")


@pytest.fixture(scope="module")
def nf4_reference(mha_dir):
    """Transformers' fp32 model holding bitsandbytes' NF4 round trip of every decoder linear: what
    bitsandbytes' Linear4bit computes on a CPU without AVX512-BF16, on every CPU (tests/bnb_reference.py:
    bitsandbytes 0.50.2 runs a bfloat16 kernel on CPUs with it, backends/cpu/ops.py). Tests that wrap it
    with PEFT take a copy."""
    ref, replaced = quantized_reference(mha_dir, "nf4")
    assert replaced == 7 * 2  # every projection of both layers; embeddings and lm_head stay unquantized
    return ref


def test_nf4_model_equals_transformers_bitsandbytes(mha_dir, nf4_reference):
    model, params = load_pretrained(mha_dir, Runtime(base_quant="nf4"))
    q = params["layers"]["attn"]["q_proj"]["kernel"]
    assert isinstance(q, quant.NF4Weight) and q.codes.dtype == jnp.uint8 and q.codes.shape == (2, 64, 32)
    assert isinstance(params["lm_head"]["kernel"], jax.Array) and isinstance(params["embed_tokens"], jax.Array)
    ours = np.asarray(model.apply({"params": params}, jnp.asarray(IDS)))
    with torch.no_grad():
        theirs = nf4_reference(torch.as_tensor(IDS)).logits.numpy()
    print(f"NF4 logits: max |ours - reference| = {np.abs(ours - theirs).max():.1e}")
    np.testing.assert_allclose(ours, theirs, atol=2e-5, rtol=0)
    # The score target: summed log-likelihoods of each row within 1e-3 (here far tighter).
    np.testing.assert_allclose(_log_probs(ours, IDS).sum(1), _log_probs(theirs, IDS).sum(1), atol=1e-4, rtol=0)


def test_the_nf4_reference_is_bitsandbytes_plain_linear4bit(mha_dir, nf4_reference):
    """The reference computes exactly what bitsandbytes' own Linear4bit computes on a CPU without
    AVX512-BF16 (its `gemm_4bit` default kernel: dequantize_4bit, then an fp32 linear), here forced onto
    that path on any CPU through the attribute bitsandbytes 0.50.2 itself reads (nn/modules.py)."""
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(str(mha_dir), quantization_config=q, dtype=torch.float32,
                                                 device_map="cpu").eval()
    linears = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(linears) == 7 * 2 and all(hasattr(m, "support_avx512bf16_for_cpu") for m in linears)
    for m in linears:
        m.support_avx512bf16_for_cpu = False
    with torch.no_grad():
        plain = model(torch.as_tensor(IDS)).logits.numpy()
        ref = nf4_reference(torch.as_tensor(IDS)).logits.numpy()
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in linears)  # never fused
    np.testing.assert_array_equal(plain, ref)  # the same torch linear on the same dequantized weights


def test_int8_model_is_the_int8params_weights_in_fp32(mha_dir):
    """Weight-only int8: our logits equal transformers' fp32 model holding bitsandbytes' dequantized
    CB * SCB / 127 (bitsandbytes' own int8 matmul also quantizes the activations, which we do not)."""
    ref, replaced = quantized_reference(mha_dir, "int8")
    assert replaced == 7 * 2
    with torch.no_grad():
        theirs = ref(torch.as_tensor(IDS)).logits.numpy()
    model, params = load_pretrained(mha_dir, Runtime(base_quant="int8"))
    assert params["layers"]["mlp"]["up_proj"]["kernel"].cb.dtype == jnp.int8
    np.testing.assert_allclose(np.asarray(model.apply({"params": params}, jnp.asarray(IDS))), theirs, atol=2e-5, rtol=0)


def test_lora_gradients_on_nf4_equal_peft_on_bitsandbytes(mha_dir, nf4_reference, tmp_path):
    from peft import PeftModel

    from flacuna_jax.peft_io import load_adapter, save_adapter

    model, base = load_pretrained(mha_dir, Runtime(base_quant="nf4"), LORA)
    lora = init_lora_params(model, jax.random.key(3))
    lora = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(4), x.shape), lora)  # B != 0
    save_adapter(tmp_path / "adapter", lora, LORA)
    ids = jnp.asarray(IDS)

    def loss(trainable):
        logits = model.apply({"params": merge_params(trainable, base)}, ids)
        return -_log_probs_sum(logits, ids)

    ours = jax.grad(loss)(lora)
    peft = PeftModel.from_pretrained(copy.deepcopy(nf4_reference), str(tmp_path / "adapter"), is_trainable=True)
    logits = peft(torch.as_tensor(IDS)).logits
    lp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, torch.as_tensor(IDS)[:, 1:, None])
    (-lp.sum()).backward()
    grads = {n.replace(".default", ""): p.grad.numpy() for n, p in peft.named_parameters() if "lora_" in n}
    (tmp_path / "grads").mkdir()
    from flacuna_jax.safetensors_io import write_safetensors

    write_safetensors(tmp_path / "grads" / "adapter_model.safetensors", list(grads.items()), {"format": "pt"})
    (tmp_path / "grads" / "adapter_config.json").write_text((tmp_path / "adapter" / "adapter_config.json").read_text())
    _, theirs = load_adapter(tmp_path / "grads", model.config)
    rel = [float(np.linalg.norm(np.asarray(a) - b) / np.linalg.norm(b))
           for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs))]
    print(f"LoRA gradients on NF4: worst factor's relative difference = {max(rel):.1e}")
    assert max(rel) <= 1e-4, rel


def _log_probs_sum(logits, ids):
    lp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(lp[:, :-1], ids[:, 1:, None], axis=-1).sum()


@pytest.mark.parametrize("kind,double", [("nf4", False), ("nf4", True), ("int8", False)])
def test_quantized_base_shards_like_bf16_weights_and_computes_the_same(mha_dir, kind, double):
    rt = Runtime(base_quant=kind, double_quant=double)
    model, single = load_pretrained(mha_dir, rt)
    mesh = make_mesh(data=1, fsdp=4, tensor=2)
    _, sharded = load_pretrained(mha_dir, rt, mesh=mesh)
    leaf = sharded["layers"]["mlp"]["gate_proj"]["kernel"]  # kernel axes (embed, mlp): [out] over tensor, [in] over fsdp
    first = leaf.codes if kind == "nf4" else leaf.cb
    assert tuple(first.sharding.spec) == (None, "tensor", "fsdp")
    assert first.addressable_shards[0].data.shape == (first.shape[0], first.shape[1] // 2, first.shape[2] // 4)
    ids = jnp.asarray(IDS)
    a = model.apply({"params": single}, ids)
    b = jax.jit(lambda p: model.apply({"params": p}, ids))(sharded)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=0)
    shapes, names = abstract_params(model)  # what the planner and the loader see
    assert jax.tree.structure(shapes) == jax.tree.structure(jax.tree.map(lambda x: x, single))
    frozen, trainable = split_params(single, "lora")[1], split_params(single, "lora")[0]
    assert not trainable and jax.tree.structure(frozen) == jax.tree.structure(single)


def test_double_quant_is_smaller_and_close(mha_dir):
    _, plain = load_pretrained(mha_dir, Runtime(base_quant="nf4"))
    _, nested = load_pretrained(mha_dir, Runtime(base_quant="nf4", double_quant=True))
    p, n = plain["layers"]["attn"]["o_proj"]["kernel"], nested["layers"]["attn"]["o_proj"]["kernel"]
    assert n.absmax.dtype == jnp.uint8 and p.absmax.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(n.dequantize(jnp.float32)), np.asarray(p.dequantize(jnp.float32)),
                               atol=float(np.abs(np.asarray(p.absmax)).max()) * 0.02)


def test_config_refuses_quantized_full_finetune_and_double_quant_without_nf4():
    from flacuna_jax.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="model.base_quant"):
        load_config(None, ["model.base_quant=nf4", "finetune=full"])
    with pytest.raises(ConfigError, match="model.double_quant"):
        load_config(None, ["model.base_quant=int8", "model.double_quant=true"])
    with pytest.raises(ConfigError, match="model.base_quant"):
        load_config(None, ["model.base_quant=nf3"])


def test_inference_applies_an_adapter_on_top_of_the_quantized_base(mha_dir, nf4_reference, tmp_path):
    """--adapter with --base-quant: the factors beside the NF4 kernels (unfolded), as PEFT on bitsandbytes."""
    from peft import PeftModel

    from flacuna_jax.inference import load_for_inference
    from flacuna_jax.peft_io import save_adapter

    model, _ = load_pretrained(mha_dir, Runtime(), LORA)
    lora = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(5), x.shape),
                        init_lora_params(model, jax.random.key(6)))
    save_adapter(tmp_path / "a", lora, LORA)
    qmodel, params = load_for_inference(str(mha_dir), adapter=str(tmp_path / "a"), base_quant="nf4")
    assert "lora_a" in params["layers"]["attn"]["q_proj"] and qmodel.lora is not None
    ours = np.asarray(qmodel.apply({"params": params}, jnp.asarray(IDS)))
    peft = PeftModel.from_pretrained(copy.deepcopy(nf4_reference), str(tmp_path / "a")).eval()
    with torch.no_grad():
        theirs = peft(torch.as_tensor(IDS)).logits.numpy()
    np.testing.assert_allclose(ours, theirs, atol=2e-5, rtol=0)


def test_lora_training_on_nf4_then_inference_and_export(tmp_path_factory):
    """train (LoRA on an NF4 base, mesh data 4 x fsdp 2) -> checkpoint (no base in it) -> score with --run
    and --base-quant (factors on top) == the exported PEFT adapter on the same base -> merged export
    onto the ORIGINAL weights (untargeted tensors bit-identical to the source, never dequantized)."""
    from flacuna_jax import train
    from flacuna_jax.config import load_config
    from flacuna_jax.convert import export_run
    from flacuna_jax.inference import load_for_inference
    from flacuna_jax.safetensors_io import SafetensorsFile
    from flacuna_jax.hf import TensorSource
    from tests.helpers import write_train_assets

    d = tmp_path_factory.mktemp("qlora_train")
    assets = write_train_assets(d)
    out = d / "run"
    cfg = load_config("configs/demo.yaml", [
        f"output_dir={out}", f"model.path={assets['model']}", f"tokenizer.path={assets['model']}",
        "model.compute_dtype=float32", "model.param_dtype=float32", "model.remat=full", "model.base_quant=nf4",
        f"data.sources=[{assets['sample']}]", "data.eval_fraction=0.0", "train.steps=3", "train.seq_len=64",
        "train.global_batch_size=8", "train.per_device_batch_size=1", "lora.rank=4", "lora.dropout=0.0",
        "lora.targets=[q_proj, v_proj]", "optim.lr=1e-2", "optim.warmup_steps=1", "checkpoint.every=3", "log.every=1", "log.tensorboard=false",
        "eval.every=0", "mesh.fsdp=2", "mesh.data=4"])
    summary = train.run(cfg)
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert len(losses) == 3 and all(np.isfinite(losses)), summary
    ckpt_bytes = sum(f.stat().st_size for f in (out / "checkpoints").rglob("*") if f.is_file())
    assert ckpt_bytes < 2_000_000  # LoRA + optimizer state only, never the (quantized) base

    export_run(out, d / "adapter", "peft")
    ids = jnp.asarray(IDS % 100)
    m_run, p_run = load_for_inference(assets["model"], run=str(out), base_quant="nf4")
    m_ad, p_ad = load_for_inference(assets["model"], adapter=str(d / "adapter"), base_quant="nf4")
    assert isinstance(p_run["layers"]["attn"]["q_proj"]["kernel"], quant.NF4Weight)
    np.testing.assert_array_equal(np.asarray(m_run.apply({"params": p_run}, ids)), np.asarray(m_ad.apply({"params": p_ad}, ids)))

    export_run(out, d / "merged", "merged")
    src, merged = TensorSource(assets["model"]), SafetensorsFile(d / "merged" / "model.safetensors")
    np.testing.assert_array_equal(merged.get("model.layers.0.mlp.up_proj.weight"), src.get("model.layers.0.mlp.up_proj.weight"))
    assert not np.array_equal(merged.get("model.layers.0.self_attn.q_proj.weight"), src.get("model.layers.0.self_attn.q_proj.weight"))


def test_planner_counts_the_quantized_bytes_exactly():
    """One device: NF4 projections at 0.5 + 4/64 bytes a weight (int8: 1 + 4 per row), the rest in param_dtype."""
    from flacuna_jax.config import load_config
    from flacuna_jax.plan import plan
    from flacuna_jax.tiny import PRESETS

    c = PRESETS["mha"]
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    projections = [(c.hidden_size, q), (c.hidden_size, kv), (c.hidden_size, kv), (q, c.hidden_size),
                   (c.hidden_size, c.intermediate_size), (c.hidden_size, c.intermediate_size),
                   (c.intermediate_size, c.hidden_size)]
    rest = 2 * (2 * c.vocab_size * c.hidden_size + (2 * c.num_layers + 1) * c.hidden_size)  # bf16
    lora = 4 * c.num_layers * 8 * (2 * c.hidden_size + q + kv)  # fp32 A and B of q_proj, v_proj, r=8
    expect = {"nf4": sum(i * o // 2 + i * o // 64 * 4 for i, o in projections),
              "int8": sum(i * o + 4 * o for i, o in projections)}
    for kind, proj_bytes in expect.items():
        cfg = load_config("configs/demo.yaml", ["lora.targets=[q_proj, v_proj]", "lora.rank=8", "train.seq_len=32",
                                                "train.global_batch_size=1", "train.per_device_batch_size=1",
                                                "model.param_dtype=bfloat16", f"model.base_quant={kind}"])
        assert plan(cfg, c, jax.devices()[:1]).params == c.num_layers * proj_bytes + rest + lora
