"""A half-precision model on a CPU without native half-precision GEMMs calibrates in fp32 (compute_dtype.py).

- The choice: fp32 only for bf16/fp16 hidden states on such a CPU; the model's own dtype otherwise.
- `computing_in`: the block's Linears multiply in fp32 on weights upcast per call, exactly as an fp32
  copy of the block would; its other half-precision tensors are fp32 within and the very same
  tensors, back in their dtype and values, after.
- A whole calibration in fp32 leaves a bf16 model with bf16 tensors everywhere and is as accurate as
  one in bf16; the fold test of producer_folding.py runs once per block class, not per block.
"""

import copy

import pytest
import torch
from conftest import sqnr_db, tiny_llama

import hf_ptq_plugin.calibration.compute_dtype as compute_dtype
from hf_ptq_plugin import PTQConfig, quantize
from hf_ptq_plugin.calibration import producer_folding
from hf_ptq_plugin.calibration.blocks import capture_block_inputs
from hf_ptq_plugin.modules.quant_linear import QuantLinear


def _native(monkeypatch, native: bool) -> None:
    monkeypatch.setattr(compute_dtype, "cpu_computes_natively", lambda dtype: native or dtype == torch.float32)


def _spy_on_computing_in(monkeypatch) -> list:
    """The dtypes streamed calibration's blocks compute in, appended as they start."""
    used, original = [], compute_dtype.computing_in
    monkeypatch.setattr("hf_ptq_plugin.calibration.streamed.computing_in",
                        lambda block, dtype: used.append(dtype) or original(block, dtype))
    return used


def _inputs(dtype):
    model = tiny_llama().to(dtype)
    return model, capture_block_inputs(model, model.model.layers, lambda m: m(torch.randint(0, 320, (2, 16))))


@pytest.mark.parametrize("dtype, native, expected", [
    (torch.bfloat16, False, torch.float32), (torch.float16, False, torch.float32),
    (torch.bfloat16, True, None), (torch.float32, False, None)])
def test_fp32_only_for_half_precision_without_native_instructions(monkeypatch, dtype, native, expected):
    _native(monkeypatch, native)
    model, inputs = _inputs(dtype)
    assert compute_dtype.calibration_dtype(model.model.layers, inputs) == expected


def test_cast_inputs_upcasts_every_half_precision_tensor_and_nothing_else():
    inputs = [((torch.ones(2, 3, dtype=torch.bfloat16),),
               {"position_embeddings": (torch.ones(3, dtype=torch.bfloat16), torch.ones(3, dtype=torch.bfloat16)),
                "cache_position": torch.arange(3), "use_cache": False}, None)]
    (args, kwargs, mask), = compute_dtype.cast_inputs(inputs, torch.float32)
    assert args[0].dtype == torch.float32 and mask is None and kwargs["use_cache"] is False
    assert [t.dtype for t in kwargs["position_embeddings"]] == [torch.float32, torch.float32]
    assert isinstance(kwargs["position_embeddings"], tuple) and kwargs["cache_position"].dtype == torch.int64
    assert compute_dtype.cast_inputs(inputs, None) is inputs


def test_a_block_computing_in_fp32_is_an_fp32_copy_of_it_and_hands_its_tensors_back():
    model, inputs = _inputs(torch.bfloat16)
    block = model.model.layers[0]
    fp32_copy = copy.deepcopy(block).float()
    before = {name: (t, t.dtype, t.clone()) for name, t in [*block.named_parameters(), *block.named_buffers()]}
    args, kwargs, _ = compute_dtype.cast_inputs(inputs, torch.float32)[0]
    with torch.no_grad():
        expected = _hidden(fp32_copy(*args, **kwargs))
        with compute_dtype.computing_in(block, torch.float32):
            assert block.input_layernorm.weight.dtype == torch.float32
            assert block.mlp.down_proj.weight.dtype == torch.bfloat16  # upcast per call, never held
            got = _hidden(block(*args, **kwargs))
    assert got.dtype == torch.float32 and torch.equal(got, expected)
    for name, t in [*block.named_parameters(), *block.named_buffers()]:
        tensor, dtype, values = before[name]
        assert t is tensor and t.dtype == dtype and torch.equal(t, values), name
    assert not any("forward" in vars(m) for m in block.modules())  # the class's forward again


def _hidden(output):
    return output[0] if isinstance(output, tuple) else output


def test_quantized_modules_keep_their_own_tensors():
    model, _ = _inputs(torch.bfloat16)
    quantize(model, PTQConfig(qformat="int4_awq", algorithm="awq_lite", pre_quant_scales="keep"),
             lambda m: m(torch.randint(0, 320, (1, 8))))
    block = model.model.layers[0]
    kept = {name: t.dtype for name, t in block.named_buffers()}
    assert kept["self_attn.o_proj.pre_quant_scale"] == torch.bfloat16  # a half-precision tensor to keep
    with compute_dtype.computing_in(block, torch.float32):
        assert {name: t.dtype for name, t in block.named_buffers()} == kept


@pytest.mark.parametrize("algorithm", ["awq_lite", "gptq"])
def test_fp32_calibration_of_a_bf16_model_leaves_it_bf16_and_as_accurate(monkeypatch, algorithm):
    torch.manual_seed(2)
    ids = torch.randint(0, 320, (8, 64))
    with torch.no_grad():
        unquantized = tiny_llama(0, layers=3).to(torch.bfloat16)(ids).logits
    accuracy, used = {}, _spy_on_computing_in(monkeypatch)
    for native in (True, False):
        _native(monkeypatch, native)
        model = tiny_llama(0, layers=3).to(torch.bfloat16)
        quantize(model, PTQConfig(qformat="int4_awq", algorithm=algorithm), forward_loop=lambda m: m(ids))
        assert set(used) == {None if native else torch.float32}
        used.clear()
        assert all(t.dtype == torch.bfloat16 for t in model.parameters())
        assert all(m.dtype == torch.bfloat16 for m in model.modules() if isinstance(m, QuantLinear))
        with torch.no_grad():
            logits = model(ids).logits
        assert logits.dtype == torch.bfloat16
        accuracy[native] = sqnr_db(unquantized, logits)
    assert abs(accuracy[True] - accuracy[False]) < 0.5, accuracy


def test_the_fold_test_runs_once_per_block_class(monkeypatch):
    calls = []
    original = producer_folding._folds_exactly
    monkeypatch.setattr(producer_folding, "_folds_exactly", lambda *a: calls.append(a[3].consumer) or original(*a))
    model = tiny_llama(layers=3)
    quantize(model, PTQConfig(qformat="int4_awq", algorithm="awq_lite", group_size=64),
             lambda m: m(torch.randint(0, 320, (2, 16))))
    assert sorted(calls) == ["model.layers.0.mlp.down_proj", "model.layers.0.self_attn.o_proj"]
    assert not any(getattr(m, "pre_quant_scale", None) is not None for m in model.modules())  # every block folded


def test_moe_blocks_calibrate_in_the_models_dtype(monkeypatch):
    """Fused experts become QuantExperts of their weights' dtype, so their blocks are not upcast."""
    from conftest import tiny_moe

    from hf_ptq_plugin.modules.quant_experts import QuantExperts

    _native(monkeypatch, False)
    upcast = _spy_on_computing_in(monkeypatch)
    model = tiny_moe("qwen3_moe").to(torch.bfloat16)
    quantize(model, PTQConfig(qformat="int4_awq", algorithm="awq_lite", group_size=64),
             lambda m: m(torch.randint(0, 320, (2, 16))))
    assert upcast and set(upcast) == {None}
    experts = [m for m in model.modules() if isinstance(m, QuantExperts)]
    assert experts and all(m.projections("down")[0].dtype == torch.bfloat16 for m in experts)
