#!/usr/bin/env bash
# `make demo`: the whole Flacuna path on a tiny model, on CPU, in a few minutes.
#   1. the embedded FLAN-Mini-style sample + its SentencePiece tokenizer  (flacuna_jax.demo_assets)
#   2. a tiny random LLaMA written as a Hugging Face dir                  (flacuna_jax.tiny)
#   3. LoRA training with configs/demo.yaml                               (flacuna_jax.train)
#   4. export: PEFT adapter + merged HF dir                               (flacuna_jax.convert)
#   5. load the merged dir with transformers and print a generation
#   6. the same prompt through flacuna_jax.generate with the PEFT adapter; fails unless the greedy
#      tokens are the same                                                 (scripts/demo_same_tokens.py)
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
# (the demo preset's final norm is scaled 10x so that LoRA on a random base can learn: see tiny.py)
$PY -m flacuna_jax.tiny --preset demo --vocab-size "$VOCAB" --out "$OUT/model"
cp "$OUT/assets/tokenizer/"* "$OUT/model/"

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

echo "== 4. export peft + merged"
rm -rf "$OUT/peft" "$OUT/merged"   # the demo's own previous exports (export refuses to mix into them)
$PY -m flacuna_jax.convert export --run "$RUN" --format peft --out "$OUT/peft"
$PY -m flacuna_jax.convert export --run "$RUN" --format merged --out "$OUT/merged"
QUESTION="Write a Python function add(a, b) that returns the sum of a and b."
echo "== 5. generate with transformers from $OUT/merged"
$PY scripts/demo_same_tokens.py hf --merged "$OUT/merged" --prompt "$QUESTION" --max-new-tokens 40 \
  --out "$OUT/transformers_tokens.json"
echo "== 6. the same prompt with our JAX decoder: base model + exported PEFT adapter (the same tokens, checked)"
$PY scripts/demo_same_tokens.py prompt --prompt "$QUESTION" --out "$OUT/prompt.jsonl"
$PY -m flacuna_jax.generate --model "$OUT/model" --adapter "$OUT/peft" --max-new-tokens 40 \
  --data "$OUT/prompt.jsonl" --out "$OUT/flacuna_jax_tokens.jsonl"
$PY -c "import json, sys; print('ASSISTANT (flacuna_jax):', json.loads(open(sys.argv[1]).readline())['completion'])" \
  "$OUT/flacuna_jax_tokens.jsonl"
$PY scripts/demo_same_tokens.py check "$OUT/transformers_tokens.json" "$OUT/flacuna_jax_tokens.jsonl"
echo "== demo done in $(( $(date +%s) - T0 ))s"
