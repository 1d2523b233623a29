"""o_proj's and down_proj's smoothing scales fold into v_proj's and up_proj's rows (PTQConfig.pre_quant_scales)."""

import copy

import pytest
import torch
from conftest import tiny_llama

from hf_ptq_plugin import PTQConfig, quantize
from hf_ptq_plugin.calibration.blocks import capture_block_inputs
from hf_ptq_plugin.calibration.producer_folding import FoldPair, find_fold_pairs

SMOOTHED = [("int4_awq", "awq_lite"), ("int4_awq", "awq_full"), ("w4a8_awq", "awq_full"),
            ("nvfp4_awq", "awq_full"), ("int8_sq", "smoothquant")]


def _ids():
    torch.manual_seed(1)
    return torch.randint(0, 320, (2, 24))


def _loop(ids):
    return lambda model: [model(input_ids=ids[i:i + 1]) for i in range(len(ids))]


def _scales_left(model):
    return sorted(name for name, m in model.named_modules() if getattr(m, "pre_quant_scale", None) is not None)


@pytest.mark.parametrize("qformat, algorithm", SMOOTHED)
def test_fold_leaves_no_pre_quant_scale_and_keep_leaves_modelopts_layout(qformat, algorithm):
    ids = _ids()
    folded = quantize(tiny_llama(), PTQConfig(qformat=qformat, algorithm=algorithm, group_size=64
                                              if qformat in ("int4_awq", "w4a8_awq") else None), _loop(ids))
    kept = quantize(tiny_llama(), PTQConfig(qformat=qformat, algorithm=algorithm, pre_quant_scales="keep",
                                            group_size=64 if qformat in ("int4_awq", "w4a8_awq") else None), _loop(ids))
    assert _scales_left(folded) == []
    left = _scales_left(kept)
    assert {n.rpartition(".")[2] for n in left} >= {"o_proj", "down_proj"}, left
    with torch.no_grad():
        reference = tiny_llama()(input_ids=ids).logits
        folded_error = (folded(input_ids=ids).logits - reference).pow(2).mean()
        kept_error = (kept(input_ids=ids).logits - reference).pow(2).mean()
    assert folded_error < 1.5 * kept_error, (folded_error, kept_error)  # folding is not a loss of accuracy


@pytest.mark.parametrize("qformat, algorithm", [("int4_awq", "awq_lite"), ("int8_sq", "smoothquant")])
def test_a_bf16_model_folds_as_an_fp32_one(qformat, algorithm):
    """The fold checks observe the block's Linears in the model's dtype, without changing what they read."""
    model = tiny_llama().to(torch.bfloat16)
    quantize(model, PTQConfig(qformat=qformat, algorithm=algorithm, group_size=64 if qformat == "int4_awq" else None),
             _loop(_ids()))
    assert _scales_left(model) == []
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


def test_without_grouped_query_attention_the_fold_moves_the_same_scale():
    """MHA: nothing is tied, so the folded model computes what the kept one does, up to the rounding of
    the scaled v_proj/up_proj weights (INT4 group scales absorb a row factor)."""
    ids = _ids()
    config = dict(qformat="int4_awq", algorithm="awq_lite", group_size=64)
    folded = quantize(tiny_llama(kv_heads=4), PTQConfig(**config), _loop(ids))
    kept = quantize(tiny_llama(kv_heads=4), PTQConfig(**config, pre_quant_scales="keep"), _loop(ids))
    with torch.no_grad():
        a, b = folded(input_ids=ids).logits, kept(input_ids=ids).logits
    assert (a - b).norm() / b.norm() < 2e-2


def _block_pairs(model, ids):
    block = model.model.layers[0]
    inputs = capture_block_inputs(model, model.model.layers, _loop(ids))
    linears = {f"model.layers.0.{n}": m for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
    return find_fold_pairs(block, linears, inputs)


def test_grouped_query_attention_ties_o_proj_scale_per_kv_group():
    pairs = _block_pairs(tiny_llama(), _ids())  # 4 query heads, 2 KV heads of 32
    o_proj = pairs["model.layers.0.self_attn.o_proj"]
    assert (o_proj.producer, o_proj.query_heads_per_kv, o_proj.head_dim) == ("model.layers.0.self_attn.v_proj", 2, 32)
    assert pairs["model.layers.0.mlp.down_proj"].query_heads_per_kv == 1
    scale = torch.rand(128) + 0.5
    tied = o_proj.tie(scale).view(2, 2, 32)
    assert torch.equal(tied[:, 0], tied[:, 1])
    assert torch.allclose(tied[:, 0], (scale.view(2, 2, 32).log().mean(1)).exp())
    assert torch.equal(o_proj.producer_rows(o_proj.tie(scale)), tied[:, 0].reshape(-1))


def test_a_non_linear_path_from_producer_to_consumer_keeps_the_scale(caplog):
    model = tiny_llama()
    v_proj = model.model.layers[0].self_attn.v_proj  # a norm on v: scaling its rows no longer scales o_proj's input
    v_proj.register_forward_hook(lambda module, args, out: out / out.norm(dim=-1, keepdim=True))
    pairs = _block_pairs(model, _ids())
    assert "model.layers.0.self_attn.o_proj" not in pairs and "model.layers.0.mlp.down_proj" in pairs
    assert "o_proj's smoothing scale cannot fold" in caplog.text


def test_fold_pair_without_gqa_is_the_identity():
    pair = FoldPair("a.up_proj", "a.down_proj")
    scale = torch.rand(16)
    assert pair.tie(scale) is scale and pair.producer_rows(scale) is scale


def test_auto_quantize_candidates_keep_scales_on_their_layers():
    """AutoQuantize may give v_proj another format than o_proj, so candidate scales are never folded into rows."""
    from hf_ptq_plugin.autoquant import candidates

    model, ids = tiny_llama(), _ids()
    layers = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "layers" in n}
    built = candidates.build_candidates(model, copy.copy(layers), PTQConfig(qformat="int4_awq", algorithm="awq_lite",
                                                                            group_size=64), _loop(ids))
    assert built["model.layers.0.self_attn.o_proj"].pre_quant_scale is not None


def test_unknown_choice_is_refused():
    with pytest.raises(ValueError, match="unknown pre_quant_scales 'drop'; valid: fold, keep"):
        PTQConfig(qformat="int4_awq", pre_quant_scales="drop")
