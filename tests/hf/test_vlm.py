"""Vision-language models: the language model is quantized, the vision tower and projector are not, and
the checkpoint (saved under the families' legacy tensor names) reloads to the same logits."""

import numpy as np
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
    # "lm_head" too: TensorRT-LLM matches the names of the text model it builds, which drop "language_model."
    assert written == ["language_model.lm_head", "lm_head", "multi_modal_projector*", "vision_tower*"]
    hub = json.loads((tmp_path / "hf_quant_config.json").read_text())["quantization"]["exclude_modules"]
    assert hub == written


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


# --- image+text calibration (calibration/images.py) ---

CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }} : {% for c in m['content'] %}"
                 "{% if c['type'] == 'image' %}{{ image }} {% else %}{{ c['text'] }} {% endif %}"
                 "{% endfor %}{% endfor %}")
IMAGE_TOKENS = {"llava": {"<image>": 300},
                "qwen2_vl": {"<|image_pad|>": 300, "<|video_pad|>": 301, "<|vision_start|>": 302,
                             "<|vision_end|>": 303}}
PROMPT_IMAGE = {"llava": "<image>", "qwen2_vl": "<|vision_start|><|image_pad|><|vision_end|>"}


def tiny_processor(family: str):
    """(Llava's processor, its tokenizer): a word-level tokenizer whose image tokens have the tiny config's
    ids; for qwen2_vl the processor is None (see qwen2_vl_image_batches)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import (
        CLIPImageProcessor,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )

    from hf_ptq_plugin.calibration.images import COLOURS, PROMPT, SHAPES

    words = sorted({*COLOURS, *SHAPES, *PROMPT.lower().rstrip(".").split(), "on", "a", "and", "background", "user",
                    "assistant", ":", ".", ","})
    vocab = {"<pad>": 0, "<unk>": 1, **{w: i + 2 for i, w in enumerate(words)}, **IMAGE_TOKENS[family]}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.normalizer, backend.pre_tokenizer = normalizers.Lowercase(), pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>",
                                        additional_special_tokens=list(IMAGE_TOKENS[family]))
    if family == "qwen2_vl":
        return None, tokenizer
    template = CHAT_TEMPLATE.replace("{{ image }}", PROMPT_IMAGE[family])
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return LlavaProcessor(images, tokenizer, patch_size=8, vision_feature_select_strategy="default",
                          chat_template=template, image_token="<image>", num_additional_image_tokens=1), tokenizer


def qwen2_vl_image_batches(tokenizer, samples, batch_size: int = 2):
    """Qwen2-VL batches as its processor builds them (which cannot be built here: its video processor
    needs torchvision): the image processor's patches, each image's pad token repeated once per merged
    patch between vision_start and vision_end, right-padded, and which tokens are image tokens."""
    from transformers import Qwen2VLImageProcessor

    images = Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=56 * 56, patch_size=14, merge_size=2,
                                   temporal_patch_size=2)
    batches = []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start:start + batch_size]
        encoded = images(images=[image for image, _ in chunk], return_tensors="pt")
        texts = [f"user : <|vision_start|>{'<|image_pad|>' * int(grid.prod() // 4)}<|vision_end|> describe the "
                 f"image assistant : {caption}" for grid, (_, caption) in zip(encoded["image_grid_thw"], chunk)]
        tokenizer.padding_side = "right"
        tokens = tokenizer(texts, padding=True, return_tensors="pt")
        mm_token_type_ids = (tokens["input_ids"] == IMAGE_TOKENS["qwen2_vl"]["<|image_pad|>"]).long()  # 1: image
        batches.append({**tokens, **encoded, "mm_token_type_ids": mm_token_type_ids})
    return batches


def test_synthetic_captioned_images_are_repeatable_and_their_captions_say_what_is_drawn():
    from hf_ptq_plugin.calibration.images import COLOURS, synthetic_captioned_images

    samples = synthetic_captioned_images(6, size=64, seed=3)
    again = synthetic_captioned_images(6, size=64, seed=3)
    assert [c for _, c in samples] == [c for _, c in again]
    assert all(a.tobytes() == b.tobytes() for (a, _), (b, _) in zip(samples, again))
    for image, caption in samples:
        background = caption.rstrip(".").split(" on a ")[1].removesuffix(" background")
        pixels = [tuple(p) for p in np.asarray(image).reshape(-1, 3).tolist()]
        most_common = max(set(pixels), key=pixels.count)  # the shapes cover at most about a third each
        named = {COLOURS[word] for word in caption.lower().replace(",", "").split() if word in COLOURS}
        assert most_common == COLOURS[background] and set(pixels) <= named


def test_a_captions_folder_loads_and_bad_ones_name_the_problem(tmp_path):
    from hf_ptq_plugin.calibration.images import load_captioned_images, synthetic_captioned_images

    for number, (image, caption) in enumerate(synthetic_captioned_images(2, size=32)):
        image.save(tmp_path / f"{number}.png")
        with (tmp_path / "captions.jsonl").open("a") as captions:
            captions.write(f'{{"image": "{number}.png", "caption": "{caption}"}}\n')
    loaded = load_captioned_images(tmp_path)
    assert [c for _, c in loaded] == [c for _, c in synthetic_captioned_images(2, size=32)]
    with pytest.raises(ValueError, match="no captions.jsonl in"):
        load_captioned_images(tmp_path / "missing")
    (tmp_path / "captions.jsonl").write_text('{"image": "0.png"}\n')
    with pytest.raises(ValueError, match=r"captions.jsonl:1 needs the keys 'image' and 'caption'"):
        load_captioned_images(tmp_path)


def real_token_amax(model, name, batches) -> torch.Tensor:
    """The amax of what Linear `name` reads over the batches' real tokens, the model unquantized."""
    amax, mask = [], {}
    handle = model.get_submodule(name).register_forward_hook(
        lambda m, args, out: amax.append(args[0][mask["real"]].abs().amax().float()))
    with torch.no_grad():
        for batch in batches:
            mask["real"] = batch["attention_mask"].bool()
            positions = {} if "pixel_values" in batch else {"position_ids": batch["attention_mask"].cumsum(-1) - 1}
            model(**batch, **positions)
    handle.remove()
    return torch.stack(amax).amax()


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_image_and_text_calibration_feeds_image_tokens_to_the_language_model(family, tmp_path):
    from hf_ptq_plugin.calibration.data import CalibrationLoop
    from hf_ptq_plugin.calibration.images import image_text_forward_loop, synthetic_captioned_images

    model, (processor, tokenizer) = tiny_vlm(family), tiny_processor(family)
    text = CalibrationLoop([{"input_ids": torch.randint(2, 20, (2, 12)),
                             "attention_mask": torch.ones(2, 12, dtype=torch.long)}], source="text")
    samples = synthetic_captioned_images(4, size=32 if family == "llava" else 56)
    if family == "llava":
        loop = image_text_forward_loop(processor, samples, batch_size=2, text_loop=text)
        assert loop.batches[0] is text.batches[0] and loop.source == "4 captioned images and text"
    else:
        loop = CalibrationLoop(text.batches + qwen2_vl_image_batches(tokenizer, samples))
    assert len(loop.batches) == 3 and all("pixel_values" in batch for batch in loop.batches[1:])
    image_id = IMAGE_TOKENS[family][next(iter(IMAGE_TOKENS[family]))]
    assert (loop.batches[1]["input_ids"] == image_id).sum(dim=1).min() >= 4  # the processor expanded the images
    # Calibrated on the image batches alone, a static input scale is their real tokens' amax: they ran
    # through the whole model (vision tower, projector, 3-D rotary positions for Qwen2-VL), padding left out.
    images_only = CalibrationLoop(loop.batches[1:])
    q_proj = next(n for n, _ in model.named_modules() if n.endswith("language_model.layers.0.self_attn.q_proj"))
    expected_amax = real_token_amax(model, q_proj, images_only.batches)
    quantize(model, PTQConfig(qformat="fp8", algorithm="max"), forward_loop=images_only)
    torch.testing.assert_close(model.get_submodule(q_proj).input_scale, expected_amax / 448, rtol=0, atol=0)
    inputs = {k: v for k, v in loop.batches[1].items()}
    with torch.no_grad():
        expected = model(**inputs).logits
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(type(model).from_pretrained(tmp_path)(**inputs).logits, expected)


def test_a_processor_without_chat_template_is_refused_with_the_fix():
    from hf_ptq_plugin.calibration.images import image_text_forward_loop, synthetic_captioned_images

    processor, _ = tiny_processor("llava")
    processor.chat_template = None
    with pytest.raises(ValueError, match="has no chat_template"):
        image_text_forward_loop(processor, synthetic_captioned_images(1, size=32))


def test_cli_calibrates_a_vlm_on_synthetic_captioned_images(tmp_path, capsys):
    from hf_ptq_plugin.cli import main

    source = tmp_path / "llava"
    tiny_vlm("llava").save_pretrained(source)
    tiny_processor("llava")[0].save_pretrained(source)
    main(["quantize", str(source), "--qformat", "int8_sq", "--calib_images", "synthetic:4", "--batch_size", "2",
          "--export_path", str(tmp_path / "out")])
    assert "4 captioned images" in capsys.readouterr().out  # the summary's calibration row
    reloaded = LlavaForConditionalGeneration.from_pretrained(tmp_path / "out")
    assert sum(isinstance(m, QuantLinear) for m in reloaded.modules()) == 14
    assert main(["quantize", str(source), "--qformat", "fp8", "--calib_images", "synthetic:x"]) == 1
    assert "synthetic:N needs a positive number of images N" in capsys.readouterr().err
