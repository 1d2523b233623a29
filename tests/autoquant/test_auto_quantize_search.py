"""auto_quantize end to end on tiny Llamas: groups, budget, re-solving, equality with quantize(), apply_choice."""

import json

import pytest
import torch
from autoquant_data import calibration_loop, token_batch
from conftest import tiny_llama
from torch import nn

from hf_ptq_plugin import PTQConfig, apply_choice, auto_quantize, quantize
from hf_ptq_plugin.autoquant.candidates import build_candidates
from hf_ptq_plugin.autoquant.groups import search_groups
from hf_ptq_plugin.autoquant.solver import nominal_bits
from hf_ptq_plugin.modules.quant_linear import QuantLinear


@pytest.fixture(scope="module")
def searched():
    """A tiny Llama searched over {fp8, int4_awq} at 6 bits (read-only for the tests)."""
    return auto_quantize(tiny_llama(), ["fp8", "int4_awq"], 6.0, calibration_loop(),
                         algorithms={"fp8": "max", "int4_awq": "awq_lite"})


def layer_formats(model):
    return {name: (m.fmt.name if isinstance(m, QuantLinear) else "none") for name, m in model.named_modules()
            if isinstance(m, (QuantLinear, nn.Linear)) and name != "lm_head"}


def assert_same_state(model_a, model_b):
    a, b = model_a.state_dict(), model_b.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


def test_groups_are_never_split_and_the_model_holds_the_choice(searched):
    model, result = searched
    formats = layer_formats(model)
    for group in result.groups:
        assert {formats[m] for m in group.members} == {result.choice[group.name]}
    assert sorted(len(g.members) for g in result.groups) == [1, 1, 1, 1, 2, 2, 3, 3]
    assert set(result.choice.values()) >= {"fp8", "int4_awq"}  # a real mix at this budget
    assert {n: q for n, q in formats.items() if q != "none"} == result.layer_qformats
    assert model.ptq_config.layer_qformats == result.layer_qformats


def test_the_budget_is_met_by_the_layers_the_model_holds(searched):
    model, result = searched
    numel = {name: m.in_features * m.out_features for name, m in model.named_modules()
             if isinstance(m, (QuantLinear, nn.Linear)) and name != "lm_head"}
    bits = sum(nominal_bits(q) * numel[name] for name, q in layer_formats(model).items()) / sum(numel.values())
    assert bits == pytest.approx(result.effective_bits, rel=1e-12)
    assert result.effective_bits <= result.target_bits == 6.0


def test_resolving_runs_no_forward_pass(searched):
    model, result = searched
    calls = []
    handles = [m.register_forward_pre_hook(lambda module, args: calls.append(module)) for m in model.modules()]
    try:
        solutions = [result.solve(bits) for bits in (4.0, 5.0, 7.0, 9.0, 16.0)]
    finally:
        for handle in handles:
            handle.remove()
    assert calls == []
    assert [s.effective_bits <= s.target_bits for s in solutions] == [True] * 5
    assert set(solutions[0].choice.values()) == {"int4_awq"} and set(solutions[-1].choice.values()) == {"none"}
    assert result.solve(6.0).choice == result.choice


def test_apply_choice_rebuilds_the_searched_model_bit_for_bit(searched):
    model, result = searched
    rebuilt = apply_choice(tiny_llama(), result, calibration_loop())
    assert_same_state(model, rebuilt)
    other = result.solve(5.0)
    assert {n: q for n, q in layer_formats(apply_choice(tiny_llama(), other, calibration_loop())).items()
            if q != "none"} == other.layer_qformats


def test_memory_holds_the_model_and_every_compressed_candidate(searched):
    model, result = searched
    memory = result.memory
    assert memory["peak_bytes"] == memory["model_bytes"] + sum(memory["candidate_bytes"].values())
    searched_bf16 = sum(g.elements for g in result.groups) * 2
    assert memory["candidate_bytes"]["fp8"] < 0.6 * searched_bf16  # fp8 codes + scales + biases
    assert memory["candidate_bytes"]["int4_awq"] < 0.35 * searched_bf16


@pytest.mark.parametrize("qformat, algorithm", [("int4_awq", None), ("fp8", None), ("int8_sq", None),
                                                ("int4_awq", "gptq")])
def test_one_format_everywhere_equals_quantize(qformat, algorithm):
    overrides = {qformat: algorithm} if algorithm else None
    model, result = auto_quantize(tiny_llama(), [qformat], nominal_bits(qformat), calibration_loop(),
                                  algorithms=overrides)
    # AutoQuantize keeps pre_quant_scales: a scale folded into a producer calibrated in one format
    # would be wrong for a producer assembled from another.
    reference = quantize(tiny_llama(), PTQConfig(qformat=qformat, algorithm=algorithm, pre_quant_scales="keep"),
                         calibration_loop())
    assert set(result.choice.values()) == {qformat}
    assert_same_state(model, reference)
    assert model.ptq_config == reference.ptq_config
    batch = token_batch(seed=3)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, reference(**batch).logits)


def test_true_bits_count_the_stored_scales():
    _, result = auto_quantize(tiny_llama(), ["int4_awq"], 16.0, calibration_loop(),
                              algorithms={"int4_awq": "max"}, method="kl_div")
    for group in result.groups:
        # INT4, one fp32 scale per 128 weights of a row; unquantized: the model's fp32 weights.
        assert group.true_bits == [4 + 32 / 128, 32.0]
        assert group.costs == [4.0 * group.elements, 16.0 * group.elements]
    assert set(result.choice.values()) == {"none"} and result.effective_bits == 16.0
    saved = json.loads(json.dumps(result.to_dict()))  # the search state is plain JSON
    assert saved["effective_bits"] == 16.0 and saved["groups"][0]["true_bits"] == [4.25, 32.0]


def test_score_loop_takes_a_loop_or_a_list_of_batches():
    batch = token_batch(seed=4)
    searches = [auto_quantize(tiny_llama(layers=1), ["int4_awq"], 10.0, calibration_loop(), score_loop=score_loop,
                              algorithms={"int4_awq": "max"})[1] for score_loop in ([batch], lambda m: m(**batch))]
    assert [g.scores for g in searches[0].groups] == [g.scores for g in searches[1].groups]
    assert all(g.scores[0] > 0 for g in searches[0].groups)


def test_candidates_leave_the_full_precision_model_untouched():
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _, linears = search_groups(model)
    for qformat, algorithm in (("int4_awq", "awq_lite"), ("int8_sq", "smoothquant")):  # they rescale the weights
        built = build_candidates(model, linears, PTQConfig(qformat=qformat, algorithm=algorithm), calibration_loop())
        assert all(isinstance(m, QuantLinear) and m.pre_quant_scale is not None for m in built.values())
    assert all(model.get_submodule(name) is linear for name, linear in linears.items())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert "ptq_config" not in model.__dict__


def test_kl_div_search_with_an_fp8_kv_cache():
    model, result = auto_quantize(tiny_llama(), ["fp8", "nvfp4"], 7.0, calibration_loop(), method="kl_div",
                                  kv_cache_qformat="fp8")
    assert result.effective_bits <= 7.0 and result.method == "kl_div"
    assert all(score >= 0 for g in result.groups for score in g.scores)
    assert model.ptq_config.kv_cache_qformat == "fp8"
    k_proj = model.model.layers[0].self_attn.k_proj
    assert k_proj.k_scale.item() > 0


@pytest.mark.parametrize("kwargs, message", [
    (dict(qformats=["fp9"]), r"unknown qformat 'fp9'; valid: fp8, "),
    (dict(qformats="fp8"), r"non-empty list of qformat names"),
    (dict(qformats=["none"]), r"no quantized format"),
    (dict(algorithms={"fp8": "awq_lite"}), r"'awq_lite' does not fit qformat 'fp8'; valid for it: "),
    (dict(algorithms={"nvfp4": "max"}), r"not candidates; valid: \['fp8'\]"),
    (dict(method="hessian"), r"unknown method 'hessian'; valid: gradient, kl_div"),
    (dict(method="kl_div", loss_fn=lambda outputs, batch: 0), r"loss_fn is used by method='gradient' only"),
    (dict(effective_bits=2.0), r"outside the achievable range \[8, 16\]"),
    (dict(kv_cache_qformat="int8"), r"unknown kv_cache_qformat 'int8'"),
    (dict(forward_loop=None), r"needs forward_loop=lambda model: \.\.\."),
    (dict(exclude_modules="lm_head"), r"exclude_modules must be a list of module names or patterns"),
])
def test_bad_arguments_name_the_valid_choices(kwargs, message):
    arguments = {"qformats": ["fp8"], "effective_bits": 8.0, "forward_loop": calibration_loop(), **kwargs}
    with pytest.raises(ValueError, match=message):
        auto_quantize(tiny_llama(layers=1), **arguments)


def test_a_layer_one_format_cannot_store_only_loses_that_option():
    # intermediate 200: down_proj's in_features is no multiple of NVFP4's block of 16; the other layers are.
    model, result = auto_quantize(tiny_llama(intermediate_size=200), ["nvfp4", "fp8"], 6.0, calibration_loop())
    options = {g.name: g.qformats for g in result.groups}
    for name, qformats in options.items():
        assert qformats == (["fp8", "none"] if name.endswith("down_proj") else ["nvfp4", "fp8", "none"]), name
    assert all(result.choice[name] != "nvfp4" for name in options if name.endswith("down_proj"))
    assert "nvfp4" in result.choice.values()  # the format still serves every layer it can store
    assert result.qformats == ["nvfp4", "fp8"]
    assert result.solve(8.0).effective_bits <= 8.0
