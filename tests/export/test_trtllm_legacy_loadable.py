"""Legacy TensorRT-LLM checkpoints hold exactly what trtllm-build's loaders require (`trtllm_loader_spec.py`,
written from TensorRT-LLM's source), for every legacy format, tp in {1, 2} and pp in {1, 2}, on a bfloat16
Llama whose hidden (384) and intermediate (640) sizes W4A16_AWQ / W4A8_AWQ layers pad at tp=2; and the
padded shards hold the real tensor followed by TensorRT-LLM's fill values."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM
from trtllm_loader_spec import mismatches

from hf_ptq_plugin import PTQConfig, export_checkpoint, quantize
from hf_ptq_plugin.export.trtllm_legacy import legacy_state_dict

FORMATS = ("fp8", "fp8_pc_pt", "int8_sq", "int4_awq", "w4a8_awq", "nvfp4")


def padded_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=384, intermediate_size=640, num_hidden_layers=2, num_attention_heads=4,
                         head_dim=64, num_key_value_heads=2, vocab_size=320, max_position_embeddings=256,
                         tie_word_embeddings=False)
    return LlamaForCausalLM(config).to(torch.bfloat16).eval()


@pytest.fixture(scope="module")
def models():
    """One quantized model per format (built once: the tests only export them)."""
    torch.manual_seed(1)
    token_ids = torch.randint(0, 320, (2, 24))
    built = {}
    for name in (*FORMATS, "int8_wo"):
        config = PTQConfig(qformat=name, algorithm="max", kv_cache_qformat="fp8" if name == "fp8" else "none")
        built[name] = quantize(padded_llama(), config, forward_loop=lambda m: m(token_ids))
    return built


@pytest.mark.parametrize("tp, pp", [(1, 1), (2, 1), (1, 2), (2, 2)])
@pytest.mark.parametrize("name", FORMATS)
def test_every_rank_holds_exactly_the_tensors_trtllm_build_requires(name, tp, pp, models, tmp_path):
    export_checkpoint(models[name], tmp_path, target="trtllm-legacy", tp_size=tp, pp_size=pp)
    config = json.loads((tmp_path / "config.json").read_text())
    for rank in range(tp * pp):
        assert mismatches(config, rank, load_file(tmp_path / f"rank{rank}.safetensors")) == [], rank


def test_int8_weight_only_is_refused_naming_the_route_that_keeps_its_codes(models, tmp_path):
    with pytest.raises(ValueError, match="qformat 'int8_wo' has no legacy TensorRT-LLM checkpoint: trtllm-build "
                                         "re-quantizes float W8A16 weights .* use target 'trtllm'"):
        export_checkpoint(models["int8_wo"], tmp_path / "out", target="trtllm-legacy")
    assert not (tmp_path / "out").exists()
    export_checkpoint(models["int8_wo"], tmp_path / "unified", target="trtllm")
    quant = json.loads((tmp_path / "unified" / "hf_quant_config.json").read_text())["quantization"]
    assert quant["quant_algo"] == "W8A16"


def _pad(features: int) -> int:
    return -(-features // 256) * 256  # W4A16_AWQ, group 128, tp 2: multiples of max(64, 128) x 2


@pytest.mark.parametrize("module, row, n, k", [
    ("mlp.fc", False, 640, 384), ("mlp.proj", True, 384, 640), ("attention.dense", True, 384, 256),
])
def test_padded_shards_are_the_real_tensor_then_trtllm_fill_values(module, row, n, k, models, tmp_path):
    # The whole tensor is padded at the end, then cut evenly, as TensorRT-LLM's own loader does for padded
    # layers (quantization/functional.py, postprocess_weight_only_groupwise: weights 0, scales 1, prequant 0).
    model = models["int4_awq"]
    export_checkpoint(model, tmp_path, target="trtllm-legacy", tp_size=2)
    ranks = [load_file(tmp_path / f"rank{r}.safetensors") for r in range(2)]
    full, _ = legacy_state_dict(model)
    prefix = f"transformer.layers.1.{module}."
    padded = {"weight": (0, (_pad(n) // 2, _pad(k))), "weights_scaling_factor": (1, (_pad(n), _pad(k) // 128)),
              "prequant_scaling_factor": (0, (_pad(k),))}
    for leaf, (fill, shape) in padded.items():
        pieces = [r[prefix + leaf] for r in ranks]
        if leaf == "prequant_scaling_factor":
            whole = torch.cat(pieces) if row else pieces[0]  # column-parallel layers replicate input scales
        else:
            whole = torch.cat(pieces, dim=1 if row else 0)
        assert tuple(whole.shape) == shape, leaf
        unpadded = full[prefix + leaf]
        inside = tuple(slice(0, size) for size in unpadded.shape)
        assert torch.equal(whole[inside], unpadded), leaf
        outside = torch.ones_like(whole, dtype=torch.bool)
        outside[inside] = False
        assert (whole[outside] == fill).all(), leaf


@pytest.mark.parametrize("name, tp, message", [
    ("w4a8_awq", 1, r"TensorRT-LLM builds W4A8_AWQ with group_size 128 only, not 64"),
])
def test_what_trtllm_build_refuses_is_refused_before_writing(name, tp, message, tmp_path):
    torch.manual_seed(1)
    model = quantize(padded_llama(), PTQConfig(qformat=name, algorithm="max", group_size=64),
                     forward_loop=lambda m: m(torch.randint(0, 320, (1, 8))))
    with pytest.raises(ValueError, match=message):
        export_checkpoint(model, tmp_path / "out", target="trtllm-legacy", tp_size=tp)
    assert not (tmp_path / "out").exists()


def test_padding_inside_the_attention_heads_is_refused(tmp_path):
    # hidden 384 = 6 heads x 64: o_proj's 384 inputs would pad to 512 across the two ranks' heads.
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=384, intermediate_size=512, num_hidden_layers=2, num_attention_heads=6,
                         num_key_value_heads=2, vocab_size=320, max_position_embeddings=256, tie_word_embeddings=False)
    model = quantize(LlamaForCausalLM(config).to(torch.bfloat16).eval(), PTQConfig(qformat="int4_awq", algorithm="max"))
    with pytest.raises(ValueError, match=r"W4A16_AWQ at tp_size=2 pads features to a multiple of 256; the 640 q/k/v"):
        export_checkpoint(model, tmp_path / "out", target="trtllm-legacy", tp_size=2)
