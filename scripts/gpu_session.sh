#!/usr/bin/env bash
# What CPU CI cannot check, in one call on a GPU machine; results land in $OUT (default runs/gpu_session).
#
#   bash scripts/gpu_session.sh checks|mfu|variants      (each stage fits one 10-minute device call)
#
#   checks    nvidia-smi; whether launch/gpu_env.sh's XLA flags start this jaxlib; tests/test_gpu.py
#             (cuDNN attention really used, equal to XLA's) and tests/test_model.py on the GPU
#   mfu       python -m benchmarks.mfu: 7B LoRA at seq 1280, ours vs transformers + peft (the issue's targets)
#   variants  ours alone at remat full / none x batch 2, and step_vs_torch's small shape in bf16
#
# Uses the Python on PATH (the GPU machine's, with jax[cuda], torch, transformers, peft). Anything
# missing (pytest, sentencepiece) is installed from ./.wheels (git-ignored) if it was brought along:
#   .venv/bin/pip download -d .wheels pytest sentencepiece   (here; then carry .wheels to the GPU)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-runs/gpu_session}"
mkdir -p "$OUT"
stage="${1:?usage: scripts/gpu_session.sh checks|mfu|variants}"
log() { echo "[gpu_session] $*" | tee -a "$OUT/session.log"; }

for module in pytest sentencepiece; do
  python -c "import $module" 2>/dev/null || { [ -d .wheels ] && pip install -q --no-index --find-links .wheels "$module"; }
done
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
source launch/gpu_env.sh
if ! python -c "import jax; jax.devices()" >"$OUT/xla_flags_check.txt" 2>&1; then
  log "launch/gpu_env.sh's XLA flags do not start this jaxlib (see xla_flags_check.txt); running without them"
  unset XLA_FLAGS
fi

if [[ "$stage" == checks ]]; then
  nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1
  python -c "import jax, jaxlib; print(jax.__version__, jax.devices())" >>"$OUT/nvidia-smi.txt" 2>&1
  # fp32 parity needs full-precision matmuls (the GPU default rounds fp32 inputs to TF32)
  JAX_PLATFORMS=cuda JAX_DEFAULT_MATMUL_PRECISION=highest timeout 300 python -m pytest -q tests/test_gpu.py tests/test_model.py >"$OUT/pytest_gpu.txt" 2>&1
  log "pytest (gpu): $(tail -n 1 "$OUT/pytest_gpu.txt")"
fi
if [[ "$stage" == mfu ]]; then
  timeout 420 python -m benchmarks.mfu >"$OUT/mfu.json" 2>"$OUT/mfu.err"
  log "mfu: $(tail -n 1 "$OUT/mfu.json")"
fi
if [[ "$stage" == variants ]]; then
  for v in "--remat full" "--remat none --batch 2"; do
    timeout 170 python -m benchmarks.mfu --no-torch $v >>"$OUT/mfu_variants.json" 2>>"$OUT/mfu.err"
    log "mfu $v: $(tail -n 1 "$OUT/mfu_variants.json")"
  done
  timeout 170 python -m benchmarks.step_vs_torch >"$OUT/step_vs_torch.json" 2>"$OUT/step_vs_torch.err"
  log "step_vs_torch (gpu, bf16): $(tail -n 1 "$OUT/step_vs_torch.json")"
fi
