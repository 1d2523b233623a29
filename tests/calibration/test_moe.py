"""MoE experts on tiny Qwen3-MoE / Mixtral models: swap, numerics, no-token rule, token counts, save/load."""

import copy
import json
import logging

import pytest
import torch
import torch.nn.functional as F_nn
from conftest import sqnr_db
from conftest import tiny_moe as conftest_tiny_moe
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from hf_ptq_plugin import FORMATS, PTQConfig, QuantLinear, calibrate, quantize
from hf_ptq_plugin.calibration.data import CalibrationLoop
from hf_ptq_plugin.calibration.expert_observer import ExpertObserver, ExpertSample
from hf_ptq_plugin.modules.quant_experts import QuantExperts
from hf_ptq_plugin.modules.quant_linear import reference_forward
from hf_ptq_plugin.numerics import (
    dequantize_weight,
    input_scale_from_amax,
    quantize_activation,
    quantize_weight,
    weight_buffer_specs,
)

MOE_FORMATS = ("fp8", "int8_wo", "int4_awq", "nvfp4", "w4a8_awq")
NAMES = {"qwen3_moe": ("gate_proj", "up_proj", "down_proj"), "mixtral": ("w1", "w3", "w2")}
CHECKPOINT_BLOCK = {"qwen3_moe": "mlp", "mixtral": "block_sparse_moe"}  # transformers renames .mlp. back on save
# Expert weight SQNR floors (measured on these models: fp8 31 dB, int8 44, int4 19, nvfp4 20, w4a8 19).
WEIGHT_SQNR_FLOOR_DB = {"fp8": 28, "int8_wo": 40, "int4_awq": 17, "nvfp4": 17, "w4a8_awq": 17}
TOKENS, TOP_K, EXPERTS, LAYERS = 2 * 16, 2, 4, 2


def tiny_moe(family: str, seed: int = 0):
    return conftest_tiny_moe(family, seed, layers=LAYERS, experts=EXPERTS, top_k=TOP_K)


@pytest.fixture
def ids():
    torch.manual_seed(1)
    return torch.randint(0, 320, (2, 16))


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def quantized(family, fmt, ids, **config):
    model = tiny_moe(family)
    return quantize(model, PTQConfig(qformat=fmt, algorithm="max", **config), forward_loop=lambda m: m(ids))


def experts_of(model, layer=0):
    return model.model.layers[layer].mlp.experts


@pytest.mark.parametrize("family", list(NAMES))
def test_transformers_holds_experts_as_fused_3d_parameters(family):
    experts = experts_of(tiny_moe(family))
    intermediate = 64 if family == "qwen3_moe" else 128
    assert type(experts).__name__ == {"qwen3_moe": "Qwen3MoeExperts", "mixtral": "MixtralExperts"}[family]
    assert experts.gate_up_proj.shape == (EXPERTS, 2 * intermediate, 64)
    assert experts.down_proj.shape == (EXPERTS, 64, intermediate)
    assert not any(isinstance(m, torch.nn.Linear) for m in experts.modules())


@pytest.mark.parametrize("family", list(NAMES))
@pytest.mark.parametrize("fmt", MOE_FORMATS)
def test_experts_are_swapped_with_checkpoint_buffers_and_shared_scales(family, fmt, ids):
    original = tiny_moe(family)
    model = quantized(family, fmt, ids)
    gate, up, down = NAMES[family]
    for layer in range(LAYERS):
        experts, fused = experts_of(model, layer), experts_of(original, layer)
        assert isinstance(experts, QuantExperts) and experts.names == NAMES[family]
        assert not isinstance(model.model.layers[layer].mlp.gate, QuantLinear)  # the router stays as it was
        for e in range(EXPERTS):
            expert = experts.expert(e)
            for name in NAMES[family]:
                linear = getattr(expert, name)
                specs = weight_buffer_specs(FORMATS[fmt], linear.out_features, linear.in_features, linear.group_size)
                for buffer, (shape, dtype) in specs.items():
                    assert getattr(linear, buffer).shape == shape and getattr(linear, buffer).dtype == dtype
            # gate and up are the two halves of the expert's fused (2I, H) weight, quantized as one
            whole = quantize_weight(fused.gate_up_proj[e], FORMATS[fmt], experts.projections("down")[0].group_size)
            rows = getattr(expert, gate).weight.shape[0]
            assert torch.equal(torch.cat([getattr(expert, gate).weight, getattr(expert, up).weight]), whole["weight"])
            assert rows * 2 == whole["weight"].shape[0]
            for shared in ("weight_scale_2",) + (("weight_scale",) if fmt == "fp8" else ()):
                if shared in whole:
                    assert torch.equal(getattr(expert, gate).get_buffer(shared), getattr(expert, up).get_buffer(shared))
        if FORMATS[fmt].needs_calibration_data:  # one input scale per projection for the whole layer
            for kind in ("gate_up", "down"):
                scales = torch.stack([linear.input_scale for linear in experts.projections(kind)])
                assert torch.equal(scales, scales[:1].expand_as(scales)) and bool(torch.isfinite(scales).all())


@pytest.mark.parametrize("fmt", MOE_FORMATS)
def test_forward_equals_the_original_module_on_dequantized_weights(fmt, ids, monkeypatch):
    original = experts_of(tiny_moe("qwen3_moe"))
    model = quantized("qwen3_moe", fmt, ids)
    experts = experts_of(model)
    gate_up = torch.stack([torch.cat([experts.expert(e).gate_proj.dequantized_weight(),
                                      experts.expert(e).up_proj.dequantized_weight()]) for e in range(EXPERTS)])
    down = torch.stack([experts.expert(e).down_proj.dequantized_weight() for e in range(EXPERTS)])
    assert sqnr_db(original.gate_up_proj, gate_up) > WEIGHT_SQNR_FLOOR_DB[fmt]
    assert sqnr_db(original.down_proj, down) > WEIGHT_SQNR_FLOOR_DB[fmt]
    torch.manual_seed(2)
    x = torch.randn(40, 64)
    _, weights, index = model.model.layers[0].mlp.gate(x)
    with torch.no_grad(), reference_forward(model):
        ours = experts(x, index, weights)

    # The reference: transformers' own eager experts forward on the dequantized weights, its F.linear
    # inputs quantized as the format quantizes activations, with the layer's shared input scales.
    reference = copy.deepcopy(original)
    reference.config._experts_implementation = "eager"
    with torch.no_grad():
        reference.gate_up_proj.copy_(gate_up)
        reference.down_proj.copy_(down)
    scales = {gate_up.shape[1:]: experts.expert(0).gate_proj._activation_scale(x),
              down.shape[1:]: experts.expert(0).down_proj._activation_scale(x)}
    linear = F_nn.linear
    monkeypatch.setattr(F_nn, "linear", lambda a, w, b=None: linear(
        quantize_activation(a, FORMATS[fmt], scales[tuple(w.shape)]), w.float()).to(a.dtype))
    with torch.no_grad():
        expected = reference(x, index, weights)
    monkeypatch.undo()
    # Bit-identical here; the tolerance allows BLAS to block the fused (2I, H) and split (I, H) GEMMs differently.
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-7)


def never_route_to(router, expert: int):
    """A forward hook making `router` pick its top-k among the other experts only."""
    def hook(module, args, output):
        router_logits = output[0].clone()
        router_logits[:, expert] = float("-inf")
        probs = torch.softmax(router_logits.float(), dim=-1)
        top, index = torch.topk(probs, module.top_k, dim=-1)
        if getattr(module, "norm_topk_prob", True):
            top = top / top.sum(dim=-1, keepdim=True)
        return router_logits, top.to(output[1].dtype), index

    return router.register_forward_hook(hook)


@pytest.mark.parametrize("fmt", ["fp8", "nvfp4"])
def test_an_expert_without_tokens_gets_the_layer_input_scales_and_weight_scales_from_its_weights(fmt, ids, caplog):
    model = tiny_moe("qwen3_moe")
    original = copy.deepcopy(model)
    for layer in model.model.layers:
        never_route_to(layer.mlp.gate, 3)
    inputs_amax = {}
    for i, layer in enumerate(model.model.layers):  # every token reaches some expert: gate/up amax = input amax
        layer.mlp.experts.register_forward_pre_hook(
            lambda m, args, i=i: inputs_amax.__setitem__(i, max(inputs_amax.get(i, 0.0), args[0].abs().amax().item())))
    with caplog.at_level(logging.INFO):
        quantize(model, PTQConfig(qformat=fmt), forward_loop=lambda m: m(ids))
    assert "received no calibration token" in caplog.text
    for i in range(LAYERS):
        assert model.expert_token_counts[f"model.layers.{i}.mlp.experts"][3] == 0
        experts, fused = experts_of(model, i), experts_of(original, i)
        unseen = experts.expert(3)
        expected = input_scale_from_amax(torch.tensor(inputs_amax[i]), FORMATS[fmt])
        assert torch.equal(unseen.gate_proj.input_scale, expected) and torch.equal(unseen.up_proj.input_scale, expected)
        down_scale = experts.expert(0).down_proj.input_scale
        assert torch.equal(unseen.down_proj.input_scale, down_scale) and 0 < down_scale.item() < float("inf")
        whole = quantize_weight(fused.gate_up_proj[3], FORMATS[fmt])
        for name, tensor in whole.items():
            half = unseen.gate_proj.get_buffer(name)
            assert torch.equal(half, tensor if tensor.dim() == 0 else tensor[: half.shape[0]])
        for name, tensor in quantize_weight(fused.down_proj[3], FORMATS[fmt]).items():
            assert torch.equal(unseen.down_proj.get_buffer(name), tensor)


def test_tokens_per_expert_are_reported_and_sum_to_tokens_times_top_k(ids, caplog):
    model = tiny_moe("mixtral")
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # five padding tokens, left out of the counts
    loop = CalibrationLoop([{"input_ids": ids, "attention_mask": mask}])
    with caplog.at_level(logging.INFO):
        quantize(model, PTQConfig(qformat="fp8"), forward_loop=loop)
    assert "calibration tokens per expert" in caplog.text
    assert set(model.expert_token_counts) == {f"model.layers.{i}.mlp.experts" for i in range(LAYERS)}
    for counts in model.expert_token_counts.values():
        assert len(counts) == EXPERTS and sum(counts) == (TOKENS - 5) * TOP_K


@pytest.mark.parametrize("family", list(NAMES))
@pytest.mark.parametrize("fmt", MOE_FORMATS)
def test_save_then_load_gives_bit_identical_logits_and_the_checkpoint_names(family, fmt, ids, tmp_path):
    model = quantized(family, fmt, ids)
    before = logits(model, ids)
    model.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", framework="pt") as handle:
        header = {key: (handle.get_slice(key).get_dtype(), tuple(handle.get_slice(key).get_shape()))
                  for key in handle.keys()}
    block = CHECKPOINT_BLOCK[family]
    assert not [key for key in header if "gate_up_proj" in key or key.endswith("experts.down_proj")]
    experts = experts_of(model)
    dtype_names = {torch.float8_e4m3fn: "F8_E4M3", torch.uint8: "U8", torch.int8: "I8", torch.float32: "F32"}
    for e in range(EXPERTS):
        for name in NAMES[family]:
            linear = getattr(experts.expert(e), name)
            for buffer, tensor in linear.state_dict().items():
                key = f"model.layers.0.{block}.experts.{e}.{name}.{buffer}"
                assert header[key] == (dtype_names[tensor.dtype], tuple(tensor.shape)), key
    exclude = json.loads((tmp_path / "hf_quant_config.json").read_text())["quantization"]["exclude_modules"]
    assert {f"model.layers.{i}.{block}.gate" for i in range(LAYERS)} <= set(exclude)

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(experts_of(reloaded), QuantExperts) and experts_of(reloaded).names == NAMES[family]
    assert torch.equal(logits(reloaded, ids), before)


@pytest.mark.parametrize("family", list(NAMES))
@pytest.mark.parametrize("fmt", ["int4_awq", "w4a8_awq", "nvfp4_awq"])
def test_awq_experts_save_their_pre_quant_scales_unfolded_and_load_bit_identical(family, fmt, ids, tmp_path):
    model = quantize(tiny_moe(family), PTQConfig(qformat=fmt, algorithm="awq_lite"), forward_loop=lambda m: m(ids))
    before = logits(model, ids)
    model.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys() if key.endswith("pre_quant_scale")}
    block, (gate, up, down) = CHECKPOINT_BLOCK[family], NAMES[family]
    for i in range(LAYERS):
        prefix = f"model.layers.{i}.{block}.experts"
        for names, width in (((gate, up), 64), ((down,), experts_of(model, i).intermediate_dim)):
            scales = [tensors[f"{prefix}.{e}.{name}.pre_quant_scale"] for e in range(EXPERTS) for name in names]
            assert scales[0].shape == (width,) and all(torch.equal(s, scales[0]) for s in scales)
        assert f"model.layers.{i}.self_attn.q_proj.pre_quant_scale" not in tensors  # folded into the norm
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(logits(reloaded, ids), before)


@pytest.mark.parametrize("family", list(NAMES))
@pytest.mark.parametrize("fmt", ["int8_wo", "int4_awq", "nvfp4"])
def test_quantizing_while_loading_swaps_every_layers_experts_without_placeholders(family, fmt, tmp_path):
    """Their tensors are quantize()'s: tests/calibration/test_weight_sources.py."""
    tiny_moe(family).save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=PTQConfig(qformat=fmt, algorithm="max"))
    for layer in range(LAYERS):
        experts = experts_of(loaded, layer)
        assert isinstance(experts, QuantExperts) and not list(experts.parameters(recurse=False))  # placeholders gone


def test_calibrate_after_a_compressed_load_gives_every_expert_the_layer_input_scale(ids, tmp_path):
    tiny_moe("qwen3_moe").save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=PTQConfig(qformat="fp8"))
    routing = never_route_to(model.model.layers[0].mlp.gate, 1)
    inputs_amax = []
    # The MoE block's input is its experts' (calibration swaps the experts for the source's, not the block).
    model.model.layers[0].mlp.register_forward_pre_hook(lambda m, args: inputs_amax.append(args[0].abs().amax()))
    calibrate(model, lambda m: m(ids))
    expected = input_scale_from_amax(torch.stack(inputs_amax).amax(), FORMATS["fp8"])
    assert all(torch.equal(linear.input_scale, expected) for linear in experts_of(model).projections("gate_up"))
    model.save_pretrained(tmp_path / "out")  # refuses uncalibrated layers: every expert, unrouted 1 too, is set
    routing.remove()
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "out"), ids), logits(model, ids))


def with_outlier_channels(model, channels=4, factor=20.0):
    """Make a few hidden channels of every MoE layer's input large, as AWQ's motivating outliers."""
    with torch.no_grad():
        for layer in model.model.layers:
            layer.post_attention_layernorm.weight[:channels] *= factor
    return model


def experts_inputs(model, layer=0):
    """Run `ids` later and keep the (hidden, top_k_index, top_k_weights) layer `layer`'s experts receive."""
    captured = []
    experts_of(model, layer).register_forward_pre_hook(lambda m, args: captured.append(args))
    return captured


@pytest.mark.parametrize("fmt, algorithm", [(fmt, algorithm) for fmt in ("int4_awq", "w4a8_awq", "nvfp4_awq")
                                             for algorithm in ("awq_lite", "awq_full")] + [("int8_sq", "smoothquant")])
def test_smoothing_gives_a_layers_experts_one_pre_quant_scale_per_input_and_less_output_error(fmt, algorithm, ids,
                                                                                             caplog):
    original = with_outlier_channels(tiny_moe("qwen3_moe"))
    inputs = experts_inputs(original)
    logits(original, ids)  # layer 0's experts see the same inputs in every model below (attention is
    hidden, index, weights = inputs[0]  # quantized in them, but the error is measured on these inputs)
    runs = {}
    for name in (algorithm, "max"):
        model = copy.deepcopy(original)
        with caplog.at_level(logging.WARNING):
            quantize(model, PTQConfig(qformat=fmt, algorithm=name), forward_loop=lambda m: m(ids))
        runs[name] = experts_of(model)
    assert "not applied to MoE experts" not in caplog.text
    with torch.no_grad():
        reference = experts_of(original)(hidden, index, weights)
        errors = {name: (experts(hidden, index, weights) - reference).pow(2).sum() for name, experts in runs.items()}
    assert errors[algorithm] < 0.9 * errors["max"], errors
    experts = runs[algorithm]
    for kind in ("gate_up", "down"):
        scales = [linear.pre_quant_scale for linear in experts.projections(kind)]
        assert scales[0] is not None and all(torch.equal(s, scales[0]) for s in scales)
        assert not torch.equal(scales[0], torch.ones_like(scales[0]))
    assert all(linear.pre_quant_scale is None for linear in runs["max"].projections("gate_up"))


@pytest.mark.parametrize("fmt", ["int4_awq", "nvfp4_awq"])
def test_awq_smooths_an_expert_without_tokens_with_the_shared_scale_and_rounds_it_to_nearest(fmt, ids):
    original = tiny_moe("qwen3_moe")
    model = copy.deepcopy(original)
    never_route_to(model.model.layers[0].mlp.gate, 3)
    quantize(model, PTQConfig(qformat=fmt, algorithm="awq_full"), forward_loop=lambda m: m(ids))
    experts, fused, f = experts_of(model), experts_of(original), FORMATS[fmt]
    assert model.expert_token_counts["model.layers.0.mlp.experts"][3] == 0
    unseen = experts.expert(3)
    for proj, w in ((unseen.gate_proj, fused.gate_up_proj[3]), (unseen.down_proj, fused.down_proj[3])):
        smoothed = (w.float() / proj.pre_quant_scale.float()).to(w.dtype)
        for name, tensor in quantize_weight(smoothed, f, experts.group_size).items():  # gate: the first rows
            stored = proj.get_buffer(name)
            assert torch.equal(stored, tensor if tensor.dim() == 0 else tensor[: stored.shape[0]]), name


def test_mse_searches_each_experts_weight_scales(ids):
    from hf_ptq_plugin.calibration.clipping import mse_weight_scale
    original = tiny_moe("mixtral")
    model = quantize(copy.deepcopy(original), PTQConfig(qformat="int4_awq", algorithm="mse"))
    experts, fused = experts_of(model), experts_of(original)
    for e in range(EXPERTS):
        scale = mse_weight_scale(fused.down_proj[e], FORMATS["int4_awq"], experts.group_size)
        assert torch.equal(experts.expert(e).w2.weight_scale, scale.to(experts.expert(e).w2.weight_scale.dtype))
        rtn = quantize_weight(fused.down_proj[e], FORMATS["int4_awq"], experts.group_size)["weight_scale"]
        assert not torch.equal(experts.expert(e).w2.weight_scale, rtn)


@pytest.mark.parametrize("fmt", ["int4_awq", "nvfp4", "fp8", "int8_wo"])
def test_gptq_rounds_each_expert_on_the_hessian_of_its_own_tokens(fmt, ids, caplog):
    original = tiny_moe("qwen3_moe")
    model, reference = copy.deepcopy(original), copy.deepcopy(original)
    for m in (model, reference):
        never_route_to(m.model.layers[0].mlp.gate, 3)  # expert 3 gets no token: no Hessian, round to nearest
    # Layer 0's experts are calibrated on the full-precision block's outputs, so the reference model
    # gives the same per-expert Hessians.
    with ExpertObserver(hessians=True) as observer:
        observer.add("experts", experts_of(reference))
        logits(reference, ids)
    stats = observer.stats
    with caplog.at_level(logging.WARNING):
        quantize(model, PTQConfig(qformat=fmt, algorithm="gptq"), forward_loop=lambda m: m(ids))
    assert "not applied to MoE experts" not in caplog.text
    experts, fused, stat, f = experts_of(model), experts_of(original), stats["experts"], FORMATS[fmt]
    for e in range(EXPERTS):
        mlp = experts.expert(e)
        stored = {"gate_up": torch.cat([mlp.gate_proj.dequantized_weight(), mlp.up_proj.dequantized_weight()]),
                  "down": mlp.down_proj.dequantized_weight()}
        for kind, w in (("gate_up", fused.gate_up_proj[e]), ("down", fused.down_proj[e])):
            rtn = dequantize_weight(quantize_weight(w, f, experts.group_size), f, experts.group_size)
            if e == 3:
                assert torch.equal(stored[kind], rtn)
                continue
            h = stat.hessian(kind, e)

            def output_error(q):
                d = q - w.float()
                return torch.trace(d @ h @ d.T)

            assert output_error(stored[kind]) < 0.9 * output_error(rtn), (e, kind)


@pytest.mark.parametrize("family", list(NAMES))
@pytest.mark.parametrize("fmt, algorithm, sequential", [("w4a8_awq", "awq_full", True), ("int4_awq", "gptq", True),
                                                        ("int8_sq", "smoothquant", True),
                                                        ("int4_awq", "awq_lite", False)])
def test_calibrating_after_a_compressed_load_requantizes_experts_that_save_and_reload(
        family, fmt, algorithm, sequential, ids, tmp_path):
    """The tensors and token counts are quantize()'s: tests/calibration/test_weight_sources.py."""
    tiny_moe(family).save_pretrained(tmp_path)
    config = PTQConfig(qformat=fmt, algorithm=algorithm, sequential=sequential)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=config)
    calibrate(model, lambda m: m(ids))  # the PTQConfig's algorithm, re-reading every block from the source
    assert all(isinstance(experts_of(model, i), QuantExperts) for i in range(LAYERS))
    model.save_pretrained(tmp_path / "out")  # would refuse uncalibrated expert input scales
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "out"), ids), logits(model, ids))


def test_excluded_experts_stay_fused_and_are_listed_as_excluded(ids, tmp_path):
    model = quantized("qwen3_moe", "int8_wo", ids, exclude_modules=["*mlp.experts"])
    assert type(experts_of(model)).__name__ == "Qwen3MoeExperts"
    model.save_pretrained(tmp_path)
    exclude = json.loads((tmp_path / "hf_quant_config.json").read_text())["quantization"]["exclude_modules"]
    assert {f"model.layers.{i}.mlp*" for i in range(LAYERS)} <= set(exclude)
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(tmp_path), ids), logits(model, ids))


def test_a_mixtral_checkpoint_split_into_gate_up_down_proj_loads_too(ids, tmp_path):
    """ModelOpt HEAD names every family's experts gate_proj/up_proj/down_proj, Mixtral's included."""
    from safetensors.torch import load_file, save_file

    model = quantized("mixtral", "nvfp4", ids)
    model.save_pretrained(tmp_path)
    renames = {".w1.": ".gate_proj.", ".w3.": ".up_proj.", ".w2.": ".down_proj."}
    tensors = {}
    for key, tensor in load_file(tmp_path / "model.safetensors").items():
        for old, new in renames.items():
            key = key.replace(old, new)
        tensors[key] = tensor
    assert "model.layers.0.block_sparse_moe.experts.0.gate_proj.weight_scale_2" in tensors
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert experts_of(reloaded).names == ("gate_proj", "up_proj", "down_proj")
    assert torch.equal(logits(reloaded, ids), logits(model, ids))


def test_a_missing_expert_tensor_is_named_when_loading(ids, tmp_path):
    from safetensors.torch import load_file, save_file

    quantized("qwen3_moe", "nvfp4", ids).save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    missing = "model.layers.1.mlp.experts.2.up_proj.weight_scale_2"
    del tensors[missing]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=missing.replace(".", r"\.")):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_an_expert_sample_is_every_stride_th_token_whatever_the_batches():
    tokens = torch.arange(1000, dtype=torch.float32)[:, None].repeat(1, 3)
    sample = ExpertSample(size=64)
    start = 0
    for batch in (1, 7, 300, 0, 13, 679):  # 1000 tokens in uneven batches, one empty
        sample.add(tokens[start:start + batch])
        start += batch
    assert sample.stride == 8 and torch.equal(sample.tokens, tokens[::8])  # 125 kept: between 64 and 128
    few = ExpertSample(size=64)
    few.add(tokens[:10])
    assert few.stride == 1 and torch.equal(few.tokens, tokens[:10])
