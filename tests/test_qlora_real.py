"""QLoRA on the real SmolLM2-135M-Instruct: `score --base-quant nf4 --dtype float32` equals transformers +
BitsAndBytesConfig(load_in_4bit, nf4, compute fp32) to 1e-3 per continuation (summed log-likelihood).

The reference holds bitsandbytes' NF4 round trip of every decoder linear in transformers' fp32 model
(tests/bnb_reference.py): bitsandbytes 0.50.2's own Linear4bit forward runs in bfloat16 on CPUs with
AVX512-BF16 (backends/cpu/ops.py) and computes exactly this round trip elsewhere."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("bitsandbytes")
pytestmark = pytest.mark.real

REQUESTS = [("The capital of France is", " Paris"), ("2 + 2 =", " 4"),
            ("Question: Which planet is known as the red planet?\nAnswer:", " Mars, the fourth planet from the Sun."),
            ("def add(a, b):\n    return", " a + b")]


def test_score_nf4_equals_transformers_bitsandbytes(smollm2_dir, tmp_path):
    from transformers import AutoTokenizer

    from flacuna_jax import score
    from tests.bnb_reference import quantized_reference

    data = tmp_path / "req.jsonl"
    data.write_text("".join(json.dumps({"context": c, "continuation": x}) + "\n" for c, x in REQUESTS))
    score.main(["--model", str(smollm2_dir), "--base-quant", "nf4", "--dtype", "float32", "--data", str(data),
                "--out", str(tmp_path / "out.jsonl")])
    ours = [json.loads(line)["loglik"] for line in (tmp_path / "out.jsonl").read_text().splitlines()]

    tok = AutoTokenizer.from_pretrained(str(smollm2_dir))
    ref, replaced = quantized_reference(smollm2_dir, "nf4")
    assert replaced == 7 * 30  # every projection of SmolLM2's 30 layers
    theirs = []
    for c, x in REQUESTS:
        whole, n_ctx = tok(c + x)["input_ids"], len(tok(c)["input_ids"])
        with torch.no_grad():
            logp = torch.log_softmax(ref(torch.tensor([whole])).logits[0].float(), -1)
        theirs.append(float(sum(logp[i - 1, whole[i]] for i in range(n_ctx, len(whole)))))
    print(f"summed log-likelihood: max |ours - reference| = {np.abs(np.subtract(ours, theirs)).max():.1e}")
    np.testing.assert_allclose(ours, theirs, atol=1e-3, rtol=0)
