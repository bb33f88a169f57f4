# Sourced by the GPU launch scripts: XLA settings recommended for H100-class GPUs.
# Overridable: any variable already set in the environment is kept as it is.
# Latency-hiding scheduler: overlaps FSDP all-gathers / reduce-scatters with compute.
export XLA_FLAGS="${XLA_FLAGS:---xla_gpu_enable_latency_hiding_scheduler=true}"
# Let XLA take most of GPU memory up front (default 0.75 leaves a quarter unused).
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"
export TOKENIZERS_PARALLELISM="${TOKENIZERS_PARALLELISM:-false}"
