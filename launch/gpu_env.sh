# Sourced by the GPU launch scripts (local.sh, multihost.sh, slurm.sbatch): XLA settings for H100-class GPUs.
#
# XLA_FLAGS becomes "$FLACUNA_GPU_XLA_FLAGS $XLA_FLAGS": the recommended flags below first, then yours.
# XLA takes the last value of a repeated flag, so a flag in your XLA_FLAGS overrides ours;
# FLACUNA_GPU_XLA_FLAGS="" drops the recommended set, FLACUNA_GPU_XLA_FLAGS="..." replaces it.
# Every flag here exists in jaxlib 0.10.2 (an unknown flag aborts start-up; tests/test_launch.py checks).
#   latency_hiding_scheduler          overlap FSDP all-gathers / reduce-scatters with compute
#   *_combine_threshold_bytes (128MiB) fewer, larger collectives: one per layer's weights, not per tensor
#   pipelined_all_gather/reduce_scatter  prefetch the next scanned layer's weights inside the layer loop
#   while_loop_double_buffering       lets that prefetch overlap across the scan's iterations
_recommended="--xla_gpu_enable_latency_hiding_scheduler=true \
--xla_gpu_all_gather_combine_threshold_bytes=134217728 \
--xla_gpu_reduce_scatter_combine_threshold_bytes=134217728 \
--xla_gpu_all_reduce_combine_threshold_bytes=134217728 \
--xla_gpu_enable_pipelined_all_gather=true \
--xla_gpu_enable_pipelined_reduce_scatter=true \
--xla_gpu_enable_while_loop_double_buffering=true"
_flags="${FLACUNA_GPU_XLA_FLAGS-$_recommended} ${XLA_FLAGS:-}"
_flags="${_flags#"${_flags%%[! ]*}"}"  # strip leading spaces
export XLA_FLAGS="${_flags%"${_flags##*[! ]}"}"  # and trailing ones
unset _recommended _flags
# Let XLA take most of GPU memory up front (default 0.75 leaves a quarter unused).
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"
export TOKENIZERS_PARALLELISM="${TOKENIZERS_PARALLELISM:-false}"
# Unbuffered output: if JAX stops a process because a peer died, its last lines are not lost.
export PYTHONUNBUFFERED="${PYTHONUNBUFFERED:-1}"
