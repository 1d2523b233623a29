"""Legacy TensorRT-LLM encoder-decoder checkpoint (T5, BART): encoder/ and decoder/, each config.json + rank0.

The expected names and shapes below are written from TensorRT-LLM's source (tensorrt_llm/models/enc_dec/model.py:
EncDecTransformer's vocab_embedding / position_embedding / ln_embed / layers / ln_f, EncoderLayer's attention +
attention_layernorm, DecoderLayer's self_attention / cross_attention + their layernorms, mlp.fc / gate / proj +
mlp_layernorm, DecoderModel's lm_head and top-level rel_attn_table; layers/attention.py: BertAttention's per-layer
rel_attn_table (heads, buckets); quantization/layers.py FP8Linear: weight fp8 [N, K], weights_scaling_factor and
activation_scaling_factor fp32 (1,)) and from the HF -> TensorRT-LLM renames of
examples/models/core/enc_dec/convert_checkpoint.py, not from the exporter.
"""

import json
import math

import pytest
import torch
from conftest import tiny_bart
from safetensors.torch import load_file
from transformers import (
    T5Config,
    T5ForConditionalGeneration,
    WhisperConfig,
    WhisperForConditionalGeneration,
)

from hf_ptq_plugin import PTQConfig, export_checkpoint, quantize
from hf_ptq_plugin.numerics.fp8 import fp8_dequantize, fp8_quantize

F32, FP8 = torch.float32, torch.float8_e4m3fn


def tiny_t5(gated=False):
    torch.manual_seed(0)  # d_kv 8: attention width 32 differs from d_model 64, as in Flan-T5
    config = T5Config(vocab_size=320, d_model=64, d_kv=8, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4,
                      decoder_start_token_id=0, feed_forward_proj="gated-gelu" if gated else "relu")
    return T5ForConditionalGeneration(config).eval()


def text_batch():
    torch.manual_seed(1)
    return {"input_ids": torch.randint(0, 320, (2, 12)), "decoder_input_ids": torch.randint(0, 320, (2, 8))}


def fp8_model(make, qformat="fp8", kv="none", inputs=None):
    model, inputs = make(), inputs or text_batch()
    return quantize(model, PTQConfig(qformat=qformat, algorithm="max", kv_cache_qformat=kv),
                    forward_loop=lambda m: m(**inputs))


class Q:
    """An FP8Linear of TensorRT-LLM: weight fp8 (N, K), two fp32 (1,) factors, and a bias (N,) if the layer has one."""

    def __init__(self, n, k, bias=False):
        self.n, self.k, self.bias = n, k, bias


# name: (N, K) of a quantized Linear (Q), or the shape of a plain model-dtype tensor. Per layer, then whole model.
T5_ENCODER_LAYER = {"attention.qkv": Q(96, 64), "attention.dense": Q(64, 32), "attention.rel_attn_table": (4, 32),
                    "attention_layernorm.weight": (64,), "mlp.fc": Q(128, 64), "mlp.proj.weight": (64, 128),
                    "mlp_layernorm.weight": (64,)}
T5_DECODER_LAYER = {"self_attention.qkv": Q(96, 64), "self_attention.dense": Q(64, 32),
                    "self_attention_layernorm.weight": (64,), "cross_attention.qkv": Q(96, 64),
                    "cross_attention.dense": Q(64, 32), "cross_attention_layernorm.weight": (64,), "mlp.fc": Q(128, 64),
                    "mlp.proj.weight": (64, 128), "mlp_layernorm.weight": (64,)}
T5_ENCODER = {"transformer.vocab_embedding.weight": (320, 64), "transformer.ln_f.weight": (64,)}
T5_DECODER = {**T5_ENCODER, "lm_head.weight": (320, 64), "rel_attn_table": (4, 32)}
BART_ENCODER_LAYER = {"attention.qkv": Q(192, 64, True), "attention.dense": Q(64, 64, True),
                      "attention_layernorm.weight": (64,), "attention_layernorm.bias": (64,),
                      "mlp.fc": Q(128, 64, True), "mlp.proj": Q(64, 128, True), "mlp_layernorm.weight": (64,),
                      "mlp_layernorm.bias": (64,)}
BART_DECODER_LAYER = {"self_attention.qkv": Q(192, 64, True), "self_attention.dense": Q(64, 64, True),
                      "self_attention_layernorm.weight": (64,), "self_attention_layernorm.bias": (64,),
                      "cross_attention.qkv": Q(192, 64, True), "cross_attention.dense": Q(64, 64, True),
                      "cross_attention_layernorm.weight": (64,), "cross_attention_layernorm.bias": (64,),
                      "mlp.fc": Q(128, 64, True), "mlp.proj": Q(64, 128, True), "mlp_layernorm.weight": (64,),
                      "mlp_layernorm.bias": (64,)}
BART_ENCODER = {"transformer.vocab_embedding.weight": (320, 64), "transformer.position_embedding.weight": (64, 64),
                "transformer.ln_embed.weight": (64,), "transformer.ln_embed.bias": (64,)}
BART_DECODER = {**BART_ENCODER, "lm_head.weight": (320, 64)}
EXPECTED = {
    "t5": ((T5_ENCODER, T5_ENCODER_LAYER), (T5_DECODER, T5_DECODER_LAYER)),
    "t5-gated": ((T5_ENCODER, {**T5_ENCODER_LAYER, "mlp.gate": Q(128, 64)}),
                 (T5_DECODER, {**T5_DECODER_LAYER, "mlp.gate": Q(128, 64)})),
    "bart": ((BART_ENCODER, BART_ENCODER_LAYER), (BART_DECODER, BART_DECODER_LAYER)),
}
MAKERS = {"t5": tiny_t5, "t5-gated": lambda: tiny_t5(gated=True), "bart": tiny_bart}


def expected_tensors(top, per_layer, layers=2):
    """{name: (dtype, shape)} for a `layers`-layer component."""
    specs = dict(top) | {f"transformer.layers.{i}.{leaf}": spec for i in range(layers) for leaf, spec in
                         per_layer.items()}
    out = {}
    for name, spec in specs.items():
        if not isinstance(spec, Q):
            out[name] = (F32, spec)
            continue
        out |= {f"{name}.weight": (FP8, (spec.n, spec.k)), f"{name}.weights_scaling_factor": (F32, (1,)),
                f"{name}.activation_scaling_factor": (F32, (1,))}
        if spec.bias:
            out[f"{name}.bias"] = (F32, (spec.n,))
    return out


def exported(model, directory):
    export_checkpoint(model, directory, target="trtllm-legacy")
    return {c: (load_file(directory / c / "rank0.safetensors"),
                json.loads((directory / c / "config.json").read_text())) for c in ("encoder", "decoder")}


def same(a, b):
    """Bitwise equality, also for float8 (torch.equal has no CPU float8 kernel)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.view(torch.uint8), b.view(torch.uint8)) if a.element_size() == 1 else torch.equal(a, b)


@pytest.mark.parametrize("family", list(EXPECTED))
def test_tensor_names_dtypes_and_shapes_are_those_tensorrt_llm_declares(family, tmp_path):
    files = exported(fp8_model(MAKERS[family]), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "decoder", "encoder"]
    for component, (top, per_layer) in zip(("encoder", "decoder"), EXPECTED[family]):
        assert sorted(p.name for p in (tmp_path / component).iterdir()) == ["config.json", "rank0.safetensors"]
        tensors, _ = files[component]
        assert {n: (t.dtype, tuple(t.shape)) for n, t in tensors.items()} == expected_tensors(top, per_layer)


def check_linear(tensors, name, modules):
    """A TensorRT-LLM Linear against the model's modules: q/k/v stacked on N at the largest weight scale (the
    others requantized once), one activation factor (the max), biases concatenated; one module exactly."""
    scales = [m.weight_scale.reshape(1) for m in modules]
    s_max = torch.stack(scales).amax(dim=0)
    assert torch.equal(tensors[f"{name}.weights_scaling_factor"], s_max)
    assert torch.equal(tensors[f"{name}.activation_scaling_factor"],
                       torch.stack([m.input_scale.reshape(1) for m in modules]).amax(dim=0))
    pieces = tensors[f"{name}.weight"].split([m.out_features for m in modules], dim=0)
    for module, scale, piece in zip(modules, scales, pieces):
        expected = module.weight if torch.equal(scale, s_max) else \
            fp8_quantize(fp8_dequantize(module.weight, scale), s_max)
        assert same(piece, expected)
    if modules[0].bias is not None:
        assert torch.equal(tensors[f"{name}.bias"], torch.cat([m.bias for m in modules]))


def test_bart_values_round_trip(tmp_path):
    model = fp8_model(tiny_bart)
    files = exported(model, tmp_path)
    for component in ("encoder", "decoder"):
        tensors, stack = files[component][0], getattr(model.model, component)
        attn = "self_attention" if component == "decoder" else "attention"
        assert torch.equal(tensors["transformer.vocab_embedding.weight"], stack.embed_tokens.weight)
        assert torch.equal(tensors["transformer.position_embedding.weight"], stack.embed_positions.weight[2:])
        assert torch.equal(tensors["transformer.ln_embed.bias"], stack.layernorm_embedding.bias)
        for i, layer in enumerate(stack.layers):
            prefix = f"transformer.layers.{i}"
            check_linear(tensors, f"{prefix}.{attn}.qkv", [layer.self_attn.q_proj, layer.self_attn.k_proj,
                                                           layer.self_attn.v_proj])
            check_linear(tensors, f"{prefix}.{attn}.dense", [layer.self_attn.out_proj])
            check_linear(tensors, f"{prefix}.mlp.fc", [layer.fc1])
            check_linear(tensors, f"{prefix}.mlp.proj", [layer.fc2])
            assert torch.equal(tensors[f"{prefix}.mlp_layernorm.weight"], layer.final_layer_norm.weight)
            if component == "decoder":
                cross = layer.encoder_attn  # q sees the decoder, k/v the encoder output: different input scales
                assert not torch.equal(cross.q_proj.input_scale, cross.k_proj.input_scale)
                check_linear(tensors, f"{prefix}.cross_attention.qkv", [cross.q_proj, cross.k_proj, cross.v_proj])
                check_linear(tensors, f"{prefix}.cross_attention.dense", [cross.out_proj])
                assert torch.equal(tensors[f"{prefix}.cross_attention_layernorm.bias"],
                                   layer.encoder_attn_layer_norm.bias)
    assert torch.equal(files["decoder"][0]["lm_head.weight"], model.lm_head.weight)


def test_gated_t5_values_round_trip_and_unquantized_wo_is_the_models_weight(tmp_path):
    model = fp8_model(lambda: tiny_t5(gated=True))
    files = exported(model, tmp_path)
    for component in ("encoder", "decoder"):
        tensors, stack = files[component][0], getattr(model, component)
        table = stack.block[0].layer[0].SelfAttention.relative_attention_bias.weight.T
        assert torch.equal(tensors["transformer.ln_f.weight"], stack.final_layer_norm.weight)
        for i, block in enumerate(stack.block):
            prefix, dense = f"transformer.layers.{i}", block.layer[-1].DenseReluDense
            check_linear(tensors, f"{prefix}.mlp.fc", [dense.wi_0])  # the activated branch
            check_linear(tensors, f"{prefix}.mlp.gate", [dense.wi_1])
            assert type(dense.wo) is torch.nn.Linear and torch.equal(tensors[f"{prefix}.mlp.proj.weight"],
                                                                     dense.wo.weight)
            sa = block.layer[0].SelfAttention
            attn = "self_attention" if component == "decoder" else "attention"
            check_linear(tensors, f"{prefix}.{attn}.qkv", [sa.q, sa.k, sa.v])
            if component == "encoder":
                assert torch.equal(tensors[f"{prefix}.attention.rel_attn_table"], table)
        if component == "decoder":
            assert torch.equal(tensors["rel_attn_table"], table)
            cross = stack.block[1].layer[1].EncDecAttention
            check_linear(tensors, "transformer.layers.1.cross_attention.qkv", [cross.q, cross.k, cross.v])


COMMON = {"producer": {"name": "hf_ptq_plugin"}, "dtype": "float32", "logits_dtype": "float32", "hidden_size": 64,
          "vocab_size": 320, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
          "use_parallel_embedding": False, "embedding_sharding_dim": 0,
          "mapping": {"world_size": 1, "tp_size": 1, "pp_size": 1}}
T5_DECODER_CONFIG = {
    **COMMON, "architecture": "DecoderModel", "model_type": "t5", "head_size": 8, "intermediate_size": 128,
    "norm_epsilon": 1e-6, "hidden_act": "relu", "position_embedding_type": "relative", "max_position_embeddings": 512,
    "has_position_embedding": False, "has_embedding_layernorm": False, "has_embedding_scale": False,
    "layernorm_type": 1, "layernorm_position": 0, "has_attention_qkvo_bias": False, "has_mlp_bias": False,
    "has_model_final_layernorm": True, "mlp_type": 0, "gated_act": False, "q_scaling": pytest.approx(8 ** -0.5),
    "relative_attention": True, "num_buckets": 32, "max_distance": 128, "rescale_before_lm_head": True,
    "encoder_hidden_size": 64, "encoder_num_heads": 4, "encoder_head_size": 8, "skip_cross_kv": False,
    "use_implicit_relative_attention": False, "decoder_start_token_id": 0, "eos_token_id": 1, "bos_token_id": None,
    "pad_token_id": 0, "quantization": {"quant_algo": "FP8", "kv_cache_quant_algo": None, "exclude_modules": [
        "transformer.layers.0.mlp.proj", "transformer.layers.1.mlp.proj", "lm_head"]}}
BART_ENCODER_CONFIG = {
    **COMMON, "architecture": "EncoderModel", "model_type": "bart", "head_size": 16, "intermediate_size": 128,
    "norm_epsilon": 1e-5, "hidden_act": "gelu", "position_embedding_type": "learned_absolute",
    "max_position_embeddings": 64, "has_position_embedding": True, "has_embedding_layernorm": True,
    "has_embedding_scale": False, "layernorm_type": 0, "layernorm_position": 1, "has_attention_qkvo_bias": True,
    "has_mlp_bias": True, "has_model_final_layernorm": False, "mlp_type": 0, "gated_act": False, "q_scaling": 1.0,
    "relative_attention": False, "num_buckets": 0, "max_distance": 0,
    "quantization": {"quant_algo": "FP8", "kv_cache_quant_algo": None, "exclude_modules": []}}


def test_config_json_holds_the_fields_tensorrt_llm_reads(tmp_path):
    t5 = exported(fp8_model(tiny_t5), tmp_path / "t5")
    assert t5["decoder"][1] == T5_DECODER_CONFIG
    encoder = t5["encoder"][1]
    assert encoder["architecture"] == "EncoderModel" and "encoder_hidden_size" not in encoder
    assert encoder["quantization"]["exclude_modules"] == ["transformer.layers.0.mlp.proj",
                                                          "transformer.layers.1.mlp.proj"]
    bart = exported(fp8_model(tiny_bart), tmp_path / "bart")
    assert bart["encoder"][1] == BART_ENCODER_CONFIG
    decoder = bart["decoder"][1]
    assert (decoder["architecture"], decoder["layernorm_position"], decoder["encoder_head_size"]) == \
        ("DecoderModel", 1, 16)
    assert decoder["rescale_before_lm_head"] is False and decoder["relative_attention"] is False
    assert (decoder["decoder_start_token_id"], decoder["eos_token_id"], decoder["bos_token_id"],
            decoder["pad_token_id"]) == (2, 2, 0, 1)
    assert decoder["quantization"]["exclude_modules"] == ["lm_head"]
    gated = exported(fp8_model(lambda: tiny_t5(gated=True)), tmp_path / "gated")["decoder"][1]
    assert (gated["mlp_type"], gated["gated_act"], gated["hidden_act"]) == (1, True, "gelu_new")


def tiny_whisper_fp8():
    torch.manual_seed(0)
    config = WhisperConfig(vocab_size=320, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                           decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, num_mel_bins=16,
                           max_source_positions=32, max_target_positions=32, decoder_start_token_id=1,
                           pad_token_id=0, bos_token_id=1, eos_token_id=2)
    inputs = {"input_features": torch.randn(2, 16, 64), "decoder_input_ids": torch.randint(3, 320, (2, 8))}
    return fp8_model(lambda: WhisperForConditionalGeneration(config).eval(), inputs=inputs)


REFUSED = {
    "int4_awq": (lambda: fp8_model(tiny_bart, qformat="int4_awq"), {}, r"takes qformat 'fp8'.*'modelopt'"),
    "int8_sq": (lambda: fp8_model(tiny_t5, qformat="int8_sq"), {}, r"takes qformat 'fp8'.*'int8_sq'"),
    "tp2": (lambda: fp8_model(tiny_bart), {"tp_size": 2}, r"tp_size=2, pp_size=1"),
    "pp2": (lambda: fp8_model(tiny_t5), {"pp_size": 2}, r"tp_size=1, pp_size=2"),
    "kv-fp8": (lambda: fp8_model(tiny_bart, kv="fp8"), {}, r"kv_cache_qformat 'fp8'"),
    "whisper": (tiny_whisper_fp8, {}, r"WhisperForConditionalGeneration.*target 'modelopt'"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_refusals_name_the_problem_and_leave_the_destination_as_it_was(case, tmp_path):
    make, kwargs, message = REFUSED[case]
    model, out = make(), tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=message):
        export_checkpoint(model, out, target="trtllm-legacy", **kwargs)
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and [p.name for p in out.iterdir()] == ["notes.txt"]


def test_a_failure_while_writing_leaves_nothing_half_written(tmp_path, monkeypatch):
    import safetensors.torch

    model, out, written = fp8_model(tiny_bart), tmp_path / "out", []
    real = safetensors.torch.save_file

    def save_then_fail(tensors, path, metadata=None):
        if "decoder" in str(path):  # the encoder's files are complete by now
            raise OSError("disk full")
        written.append(path)
        real(tensors, path, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", save_then_fail)
    with pytest.raises(OSError, match="disk full"):
        export_checkpoint(model, out, target="trtllm-legacy")
    assert len(written) == 1 and list(tmp_path.iterdir()) == []
    assert math.isfinite(model.model.decoder.layers[0].fc1.weight_scale.item())  # the model is untouched
