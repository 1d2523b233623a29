"""The user story end to end: quantize in memory, save_pretrained, from_pretrained, same logits."""

import pytest
import torch
from conftest import tiny_llama
from transformers import AutoModelForCausalLM

import hf_ptq_plugin
from hf_ptq_plugin import PTQConfig, quantize


@pytest.mark.parametrize("qformat, algorithm, kv", [("int4_awq", "awq_lite", "fp8"), ("int8_sq", "smoothquant", "none"),
                                                    ("nvfp4", "max", "nvfp4")])
def test_quantize_save_pretrained_from_pretrained_gives_identical_logits(qformat, algorithm, kv, token_ids, tmp_path):
    model = tiny_llama()
    quantize(model, PTQConfig(qformat=qformat, algorithm=algorithm, kv_cache_qformat=kv),
             forward_loop=lambda m: m(token_ids))
    with torch.no_grad():
        before = model(token_ids).logits
    model.save_pretrained(tmp_path)
    assert (tmp_path / "hf_quant_config.json").exists()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    with torch.no_grad():
        after = loaded(token_ids).logits
    assert torch.equal(before, after)


def test_public_api_names():
    for name in ("PTQConfig", "quantize", "calibrate", "export_checkpoint", "QuantLinear"):
        assert hasattr(hf_ptq_plugin, name), name
