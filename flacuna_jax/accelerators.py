"""What the planner and MFU know about each accelerator: memory per chip and spec-sheet dense peak.

One row per chip, with its source. `peak_flops` (MFU's denominator, as PaLM defines MFU and MaxText
reports it: the spec-sheet dense peak, never a measured rate) matches JAX's `Device.device_kind`;
`--chip NAME` on the planner takes the memory of one chip. A TPU device is one chip on every
generation here (v4 and v5p join their two TensorCores into one megacore device).

Memory is the spec sheet's figure read as 10^9 bytes (the sheets write GB; the smaller reading, so a
"fits" verdict errs on the safe side).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Chip:
    name: str  # the planner's --chip
    device_kinds: tuple[str, ...]  # jax Device.device_kind values (TPU: exact; GPU: contained in the kind)
    memory_bytes: int
    peak_bf16_flops: float  # dense, per chip
    source: str


_JAX_KINDS = "device kinds: jax/_src/pallas/mosaic/tpu_info.py chip_version_from_device_kind (jax 0.10.2)"
TPUS = (
    Chip("v4", ("TPU v4",), 32 * 10**9, 275e12,
         f"cloud.google.com/tpu/docs/v4: 275 TFLOPs bf16, 32 GB HBM2 per chip; {_JAX_KINDS}"),
    Chip("v5e", ("TPU v5 lite", "TPU v5e"), 16 * 10**9, 197e12,
         f"cloud.google.com/tpu/docs/v5e: 197 TFLOPs bf16, HBM2 16 GB per chip; {_JAX_KINDS}"),
    Chip("v5p", ("TPU v5", "TPU v5p"), 95 * 10**9, 459e12,
         f"cloud.google.com/tpu/docs/v5p: 459 TFLOPs bf16, HBM2e 95 GB per chip; {_JAX_KINDS}"),
    Chip("v6e", ("TPU v6 lite", "TPU v6e"), 32 * 10**9, 918e12,
         f"cloud.google.com/tpu/docs/v6e (Trillium): 918 TFLOPs bf16, HBM 32 GB per chip; {_JAX_KINDS}"),
)
# GPUs: the kind contains the name; the first match wins, so the PCIe/NVL parts come before the SXM one.
GPUS = (
    Chip("h100-pcie", ("H100 PCIe",), 80 * 10**9, 756e12, "NVIDIA H100 datasheet: PCIe, bf16 dense 756 TFLOPS, 80 GB"),
    Chip("h100-nvl", ("H100 NVL",), 94 * 10**9, 835e12, "NVIDIA H100 datasheet: NVL, bf16 dense 835 TFLOPS, 94 GB"),
    Chip("h100", ("H100",), 80 * 10**9, 989e12,
         "NVIDIA H100 datasheet: SXM, bf16 dense 989 TFLOPS (1979 with sparsity), 80 GB; a measured dense bf16 "
         "matmul reaches ~798e12 (DESIGN.md)"),
    Chip("h200", ("H200",), 141 * 10**9, 989e12, "NVIDIA H200 datasheet: SXM, bf16 dense 989 TFLOPS, 141 GB"),
)
CHIPS = {c.name: c for c in TPUS + GPUS}


def chip_for_kind(device_kind: str) -> Chip | None:
    """The chip behind a JAX device kind ('TPU v5 lite', 'NVIDIA H100 80GB HBM3'), or None."""
    for chip in TPUS:
        if device_kind in chip.device_kinds:
            return chip
    for chip in GPUS:
        if any(k in device_kind for k in chip.device_kinds):
            return chip
    return None


def peak_flops(device_kind: str, compute_dtype: str) -> float | None:
    """Spec-sheet dense FLOP/s of one device in `compute_dtype`; None where unknown (MFU is then not
    reported). Only bfloat16 peaks are tabled: it is what every config here computes in."""
    chip = chip_for_kind(device_kind)
    return chip.peak_bf16_flops if chip is not None and compute_dtype == "bfloat16" else None
