#!/usr/bin/env bash
# `make demo`: the whole Flacuna path on a tiny model, on CPU, in a few minutes.
#   1. the embedded FLAN-Mini-style sample + its SentencePiece tokenizer  (flacuna_jax.demo_assets)
#   2. a tiny random LLaMA written as a Hugging Face dir                  (flacuna_jax.tiny)
#   3. LoRA training with configs/demo.yaml                               (flacuna_jax.train)
#   4. export: PEFT adapter + merged HF dir                               (flacuna_jax.convert)
#   5. load the merged dir with transformers and print a generation
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
T0=$(date +%s)
OUT=build/demo
RUN=runs/demo

echo "== 1. demo data and tokenizer -> $OUT/assets"
$PY -m flacuna_jax.demo_assets --out "$OUT/assets"
VOCAB=$($PY -c "from flacuna_jax.tokenizer import load_tokenizer; print(len(load_tokenizer('$OUT/assets/tokenizer')))")

echo "== 2. tiny LLaMA (vocab $VOCAB) -> $OUT/model"
rm -rf "$OUT/model"
$PY -m flacuna_jax.tiny --preset demo --vocab-size "$VOCAB" --out "$OUT/model"
cp "$OUT/assets/tokenizer/"* "$OUT/model/"
# A random model's final RMSNorm (weight ~1) caps |logits| at ~|W_lm| * sqrt(d) ~ 2.6, so LoRA on
# the frozen random base cannot express a confident prediction and the loss plateaus near 5.3.
# Scaling the final norm weight by 10 makes the tiny base LoRA-trainable (loss ~9.6 -> ~1).
# TODO(tiny.py owner): give the `demo` preset this scale in flacuna_jax.tiny and delete this step.
$PY - "$OUT/model/model.safetensors" <<'PYEOF'
import sys
from safetensors.numpy import load_file, save_file
path = sys.argv[1]
tensors = load_file(path)
tensors["model.norm.weight"] = tensors["model.norm.weight"] * 10
save_file(tensors, path, metadata={"format": "pt"})
PYEOF

echo "== 3. train configs/demo.yaml -> $RUN"
rm -rf "$RUN"   # a fresh run each time (re-running train alone on $RUN would resume it)
$PY -m flacuna_jax.train --config configs/demo.yaml output_dir="$RUN"
$PY - "$RUN/metrics.jsonl" <<'PYEOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
first, last = rows[0]["loss"], rows[-1]["loss"]
print(f"loss {first:.3f} (step {rows[0]['step']}) -> {last:.3f} (step {rows[-1]['step']}): "
      f"{100 * (1 - last / first):.0f}% lower; eval_loss {rows[-1].get('eval_loss', float('nan')):.3f}")
PYEOF

if [ -f flacuna_jax/convert.py ]; then
  echo "== 4. export peft + merged"
  $PY -m flacuna_jax.convert export --run "$RUN" --format peft --out "$OUT/peft"
  $PY -m flacuna_jax.convert export --run "$RUN" --format merged --out "$OUT/merged"
  echo "== 5. generate with transformers from $OUT/merged"
  $PY - "$OUT/merged" <<'PYEOF'
import sys
import torch
from transformers import AutoTokenizer, LlamaForCausalLM
from flacuna_jax import templates
path = sys.argv[1]
tok = AutoTokenizer.from_pretrained(path)
model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
question = "Write a Python function add(a, b) that returns the sum of a and b."
ids = templates.encode_generation_prompt([], question, templates.SegmentTokenizer.load(tok))
with torch.no_grad():
    out = model.generate(torch.tensor([ids]), max_new_tokens=40, do_sample=False, eos_token_id=tok.eos_token_id)
print(f"USER: {question}\nASSISTANT: {tok.decode(out[0, len(ids):], skip_special_tokens=True)}")
PYEOF
else
  # TODO(convert): flacuna_jax.convert does not exist yet; steps 4-5 (export + transformers
  # generation) run automatically once it lands. Meanwhile: JAX generation from the run.
  echo "== 4. (flacuna_jax.convert not available yet) generate with the JAX model + run's LoRA"
  $PY -m flacuna_jax.generate --model "$OUT/model" --run "$RUN" --prompt "Write a Python function add(a, b) that returns the sum of a and b." --max-new-tokens 40
fi
echo "== demo done in $(( $(date +%s) - T0 ))s"
