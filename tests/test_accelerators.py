"""The accelerator table: MFU's peak per JAX device kind, the planner's memory per --chip."""

import pytest
from jax._src.pallas.mosaic import tpu_info

from flacuna_jax.accelerators import CHIPS, TPUS, chip_for_kind, peak_flops


@pytest.mark.parametrize("kind, peak", [
    ("TPU v4", 275e12), ("TPU v5 lite", 197e12), ("TPU v5e", 197e12), ("TPU v5", 459e12), ("TPU v5p", 459e12),
    ("TPU v6 lite", 918e12), ("TPU v6e", 918e12), ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H200", 989e12),
    ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H100 NVL", 835e12), ("TPU v4 lite", None), ("TPU v3", None), ("cpu", None),
])
def test_peak_flops_per_device_kind(kind, peak):
    assert peak_flops(kind, "bfloat16") == peak
    assert peak_flops(kind, "float32") is None  # only bf16 peaks are tabled


def test_tpu_kinds_are_the_ones_jax_names_and_each_chip_cites_its_source():
    versions = {"v4": tpu_info.ChipVersion.TPU_V4, "v5e": tpu_info.ChipVersion.TPU_V5E,
                "v5p": tpu_info.ChipVersion.TPU_V5P, "v6e": tpu_info.ChipVersion.TPU_V6E}
    for chip in TPUS:
        for kind in chip.device_kinds:
            assert tpu_info.chip_version_from_device_kind(kind) == versions[chip.name]
            assert chip_for_kind(kind) is chip
        assert f"cloud.google.com/tpu/docs/{chip.name}" in chip.source
    assert {n: CHIPS[n].memory_bytes for n in ("v4", "v5e", "v5p", "v6e")} == {
        "v4": 32e9, "v5e": 16e9, "v5p": 95e9, "v6e": 32e9}
    assert all(c.source for c in CHIPS.values())
