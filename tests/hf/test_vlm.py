"""Vision-language models: the language model is quantized, the vision tower and projector are not, and
the checkpoint (saved under the families' legacy tensor names) reloads to the same logits."""

import pytest
import torch
from transformers import (
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    LlavaConfig,
    LlavaForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)

from hf_ptq_plugin import PTQConfig, QuantLinear, quantize

TEXT = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=320)
VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=32,
              patch_size=8)


def tiny_vlm(family: str):
    torch.manual_seed(0)
    if family == "llava":
        config = LlavaConfig(text_config=dict(TEXT, model_type="llama"),
                             vision_config=dict(VISION, model_type="clip_vision_model"), image_token_index=300)
        return LlavaForConditionalGeneration(config).eval()
    if family == "qwen2_vl":
        text = dict(TEXT, rope_scaling={"type": "mrope", "mrope_section": [4, 6, 6]}, bos_token_id=0, eos_token_id=1)
        vision = dict(depth=2, embed_dim=64, hidden_size=128, num_heads=4, mlp_ratio=2, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2)
        config = Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=300, video_token_id=301,
                               vision_start_token_id=302)
        return Qwen2VLForConditionalGeneration(config).eval()
    if family == "gemma3":
        config = Gemma3Config(text_config=dict(TEXT, head_dim=32), vision_config=VISION, image_token_index=300,
                              boi_token_index=301, eoi_token_index=302, mm_tokens_per_image=4)
        return Gemma3ForConditionalGeneration(config).eval()
    config = Idefics3Config(text_config=TEXT, vision_config=VISION, image_token_id=300, scale_factor=2)
    return Idefics3ForConditionalGeneration(config).eval()


FAMILIES = ["llava", "qwen2_vl", "gemma3", "idefics3"]
UNQUANTIZED_PARTS = ("vision", "visual", "projector", "connector", "lm_head")


@pytest.mark.parametrize("qformat, algorithm", [("fp8", "max"), ("int4_awq", "awq_lite")])
@pytest.mark.parametrize("family", FAMILIES)
def test_text_only_calibration_quantizes_the_language_model_and_the_checkpoint_reloads(family, qformat, algorithm,
                                                                                      tmp_path):
    model = tiny_vlm(family)
    ids = torch.randint(0, 290, (2, 16))
    quantize(model, PTQConfig(qformat=qformat, algorithm=algorithm), forward_loop=lambda m: m(input_ids=ids))
    quantized = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    assert len(quantized) == 14 and not [n for n in quantized if any(p in n for p in UNQUANTIZED_PARTS)]
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    model.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path)
    assert [n for n, m in reloaded.named_modules() if isinstance(m, QuantLinear)] == quantized
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, expected)


def test_llava_exclusions_are_written_under_the_checkpoints_names(tmp_path):
    import json

    model = tiny_vlm("llava")
    ids = torch.randint(0, 290, (2, 16))
    quantize(model, PTQConfig(qformat="fp8", algorithm="max"), forward_loop=lambda m: m(input_ids=ids))
    model.save_pretrained(tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())["quantization_config"]["ignore"]
    assert written == ["language_model.lm_head", "multi_modal_projector*", "vision_tower*"]


def test_llava_quantized_while_loading_saves_and_reloads(tmp_path):
    tiny_vlm("llava").save_pretrained(tmp_path / "bf16")
    loaded = LlavaForConditionalGeneration.from_pretrained(
        tmp_path / "bf16", quantization_config=PTQConfig(qformat="int4_awq", algorithm="max"))
    ids = torch.randint(0, 290, (2, 16))
    with torch.no_grad():
        expected = loaded(input_ids=ids).logits
    loaded.save_pretrained(tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(LlavaForConditionalGeneration.from_pretrained(tmp_path / "q")(input_ids=ids).logits,
                           expected)
