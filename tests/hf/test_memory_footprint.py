"""get_memory_footprint() counts the CPU derived weights a quantized model builds on its first forward."""

import copy
import io

import pytest
import torch
from conftest import tiny_llama

from hf_ptq_plugin import PTQConfig, quantize
from hf_ptq_plugin.backends import native
from hf_ptq_plugin.hf.footprint import derived_weight_bytes
from hf_ptq_plugin.modules.quant_linear import QuantLinear


def _quantized(qformat, dtype):
    model = tiny_llama().to(dtype)
    ids = torch.randint(0, 320, (2, 16))
    return quantize(model, PTQConfig(qformat=qformat, algorithm="max"), forward_loop=lambda m: m(ids)), ids


NATIVE = native.library() is not None  # the native kernels read the checkpoint's codes: nothing derived


@pytest.mark.parametrize("qformat, dtype, bytes_per_weight", [
    ("fp8", torch.bfloat16, 0 if NATIVE else 2),  # else fbgemm's packed fp16 matrix
    ("nvfp4", torch.bfloat16, 0 if NATIVE else 2),
    ("w4a8_awq", torch.bfloat16, 1 / 32 if NATIVE else 2),  # fp32 group ratios (group 128), else fp16pack's matrix
    ("fp8", torch.float32, 0 if NATIVE else 4),  # else the reference's fp32 weight
    ("int4_awq", torch.float32, 0 if NATIVE else 4),  # the checkpoint's group scales are fp32 already
])
def test_the_footprint_grows_by_the_derived_weights_after_a_forward(qformat, dtype, bytes_per_weight):
    model, ids = _quantized(qformat, dtype)
    for module in model.modules():
        if isinstance(module, QuantLinear):
            module.cpu_weight_cache = None
    stored = type(model).get_memory_footprint(model)
    assert model.get_memory_footprint() == stored  # nothing derived before a forward
    with torch.no_grad():
        model(ids)
    weights = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, QuantLinear))
    assert derived_weight_bytes(model) == bytes_per_weight * weights
    scratch = native.scratch_bytes() if NATIVE else 0  # 32 rows: chunked decoding
    assert model.get_memory_footprint() == stored + bytes_per_weight * weights + scratch
    assert model.get_memory_footprint(return_buffers=False) < model.get_memory_footprint()


def _saved_and_loaded(model):
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def test_the_footprint_survives_deepcopy_and_torch_save():
    model, ids = _quantized("fp8", torch.float32)
    for clone in (copy.deepcopy(model), _saved_and_loaded(model)):
        assert clone.get_memory_footprint.model is clone
        assert clone.get_memory_footprint() == type(clone).get_memory_footprint(clone)  # caches dropped in copies
