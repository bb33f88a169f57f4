# Sourced on every Cloud TPU VM worker by launch/tpu_vm.sh (or by hand before python -m flacuna_jax.train):
# the libtpu settings MaxText's TPU training recipes use to overlap collectives with compute.
#
# LIBTPU_INIT_ARGS becomes "$FLACUNA_TPU_LIBTPU_ARGS $LIBTPU_INIT_ARGS": the recommended flags below first,
# then yours, so a flag you repeat in LIBTPU_INIT_ARGS overrides ours (the last value of a flag wins, as in
# XLA's own flag parsing); FLACUNA_TPU_LIBTPU_ARGS="" drops the recommended set, FLACUNA_TPU_LIBTPU_ARGS="..."
# replaces it.
#
# Sources (AI-Hypercomputer/maxtext):
#   MaxText/configs/v5e/llama2_13b.sh and llama2_7b.sh (the LLaMA-2 13B and 7B training recipes on v5e) export
#   exactly the seven below;
#   benchmarks/xla_flags_library.py says what they do:
#     DATA_PARALLEL_OVERLAP
#       --xla_tpu_enable_data_parallel_all_reduce_opt     optimize the (DCN) all-reduces of data-parallel sharding
#       --xla_tpu_data_parallel_opt_different_sized_ops   pipeline data-parallel ops across iterations
#     CF_FOR_ALL_GATHER (continuation fusion: an all-gather runs in pieces while the compute that needs it starts;
#     FSDP's per-layer weight all-gathers are exactly these)
#       --xla_tpu_enable_async_collective_fusion, ..._fuse_all_gather, ..._multiple_steps
#       --xla_tpu_overlap_compute_collective_tc           overlap compute and collectives on the TensorCore
#       --xla_enable_async_all_gather
# Every name is in libtpu 0.0.42.1's libtpu.so, the libtpu jax[tpu] 0.10.2 installs
# (pip download --no-deps "libtpu==0.0.42.*"; unzip; grep -a -w FLAG libtpu/libtpu.so): an unknown flag
# would stop libtpu at start-up.
_recommended="--xla_tpu_enable_data_parallel_all_reduce_opt=true \
--xla_tpu_data_parallel_opt_different_sized_ops=true \
--xla_tpu_enable_async_collective_fusion=true \
--xla_tpu_enable_async_collective_fusion_fuse_all_gather=true \
--xla_tpu_enable_async_collective_fusion_multiple_steps=true \
--xla_tpu_overlap_compute_collective_tc=true \
--xla_enable_async_all_gather=true"
_flags="${FLACUNA_TPU_LIBTPU_ARGS-$_recommended} ${LIBTPU_INIT_ARGS:-}"
_flags="${_flags#"${_flags%%[! ]*}"}"  # strip leading spaces
export LIBTPU_INIT_ARGS="${_flags%"${_flags##*[! ]}"}"  # and trailing ones
unset _recommended _flags
export TOKENIZERS_PARALLELISM="${TOKENIZERS_PARALLELISM:-false}"
# Unbuffered output: if JAX stops a process because a peer died, its last lines are not lost.
export PYTHONUNBUFFERED="${PYTHONUNBUFFERED:-1}"
