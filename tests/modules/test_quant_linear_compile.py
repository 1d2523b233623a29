"""torch.compile of a quantized model with dynamic shapes: one graph for every sequence length."""

import pytest
import torch
import torch._dynamo
from conftest import tiny_llama
from torch._dynamo.utils import counters

from hf_ptq_plugin import FORMATS, PTQConfig, QuantLinear, quantize
from hf_ptq_plugin.modules.layer_plan import LayerPlan
from hf_ptq_plugin.modules.quant_linear import reference_forward

LENGTHS = (5, 9, 13)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def quantized_model(name):
    model = tiny_llama(layers=1, kv_heads=4)  # 128-wide k/v projections: fp8_pb_wo's tile
    calib = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(3))
    return quantize(model, PTQConfig(qformat=name, algorithm="max"), forward_loop=lambda m: m(calib))


@pytest.mark.parametrize("name", list(FORMATS))
def test_dynamic_compile_traces_once_and_matches_eager(name):
    model = quantized_model(name)
    compiled = torch.compile(model, dynamic=True, backend="eager")  # dynamo's tracing, no code generation
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        for length in LENGTHS:
            ids = torch.randint(0, 320, (1, length), generator=torch.Generator().manual_seed(length))
            with reference_forward(model):  # what torch.compile traces: the CPU kernels' weight forms are state
                expected = model(ids).logits
            assert torch.equal(compiled(ids).logits, expected)
    assert counters["stats"]["unique_graphs"] == 1


def test_inductor_compiles_a_layer_once_for_every_number_of_rows():
    torch.manual_seed(0)
    module = QuantLinear.from_linear(torch.nn.Linear(256, 128), FORMATS["int4_awq"], plan=LayerPlan())
    compiled = torch.compile(module, dynamic=True)
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        for rows in LENGTHS:
            x = torch.randn(rows, 256)
            torch.testing.assert_close(compiled(x), module(x), rtol=1e-5, atol=1e-5)
    assert counters["stats"]["unique_graphs"] == 1
