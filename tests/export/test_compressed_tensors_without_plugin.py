"""compressed-tensors exports, loaded by transformers + compressed-tensors in a fresh interpreter that never
imports hf_ptq_plugin (`load_without_plugin.py`), compute what our model computes.

compressed-tensors computes in the model dtype. In float32 (every format but NVFP4, whose weights it
unpacks to bfloat16) the logits are bit-identical to our reference's (`reference_forward`: F.linear on the
same dense weights), and close to our CPU kernels', which sum in another order. In bfloat16 it rounds
where our layers keep float32, so each Linear is compared on the very input it saw there: its difference
from our layer must be no larger than what a one-bfloat16-ulp change of that input does to our own layer
(1.5x margin), the size of the rounding compressed-tensors adds. A wrong scale is outside that: NVFP4
declared without FP8 block scales differs 1.7x what the nudge does (q_proj: 7.5% against 4.4%); declared
right, at most 0.7x.
"""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama

from hf_ptq_plugin import PTQConfig, QuantLinear, quantize
from hf_ptq_plugin.export.compressed_tensors import COMPRESSED_TENSORS_QFORMATS, save_compressed_tensors
from hf_ptq_plugin.modules.quant_linear import reference_forward

SCRIPT = Path(__file__).with_name("load_without_plugin.py")
NVFP4 = ("nvfp4", "nvfp4_awq", "w4a16_nvfp4")
# Smoothing algorithms, whose scales fold into norms and into v_proj / up_proj rows (the tiny Llama has
# grouped-query attention, so o_proj's scale is the tied one): the export holds no pre_quant_scale.
SMOOTHED = {"int4_awq": "awq_lite", "int8_sq": "smoothquant", "nvfp4_awq": "awq_full"}
CASES = [(name, torch.float32, "max") for name in COMPRESSED_TENSORS_QFORMATS] + [
    (name, torch.bfloat16, "max") for name in COMPRESSED_TENSORS_QFORMATS] + [
    (name, torch.float32, algorithm) for name, algorithm in SMOOTHED.items()]


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    """{(qformat, dtype): (our model, what transformers computed from its export)}, one subprocess for all."""
    root = tmp_path_factory.mktemp("ct")
    torch.manual_seed(1)
    token_ids = torch.randint(0, 320, (2, 24))
    torch.save(token_ids, root / "ids.pt")
    models, argv = {}, [str(root / "ids.pt")]
    for name, dtype, algorithm in CASES:
        config = PTQConfig(qformat=name, algorithm=algorithm)
        model = quantize(tiny_llama().to(dtype), config, forward_loop=lambda m: m(token_ids))
        directory = root / f"{name}-{str(dtype)[6:]}-{algorithm}"
        save_compressed_tensors(model, directory, model.ptq_config)
        models[(name, dtype, algorithm)] = model
        argv += [str(directory), str(directory) + ".pt"]
    subprocess.run([sys.executable, str(SCRIPT), *argv], check=True, capture_output=True, timeout=600)
    return {key: (model, torch.load(root / f"{key[0]}-{str(key[1])[6:]}-{key[2]}.pt"))
            for key, model in models.items()}, token_ids


def test_transformers_loads_every_export_with_compressed_tensors_alone(loaded):
    records, _ = loaded
    for (name, dtype, _), (_, record) in records.items():
        assert record["quantizer"] == "CompressedTensorsHfQuantizer" and not record["plugin_imported"], name
        expected = torch.bfloat16 if name in NVFP4 else dtype  # NVFP4 exports say bfloat16 in config.json
        assert record["dtype"] == expected, (name, dtype)
        assert len([n for n in record["linears"] if n != "lm_head"]) == 14, name


@pytest.mark.parametrize("name, algorithm", [(n, "max") for n in COMPRESSED_TENSORS_QFORMATS if n not in NVFP4] + [
    (n, a) for n, a in SMOOTHED.items() if n not in NVFP4])
def test_float32_logits_are_bit_identical(name, algorithm, loaded):
    records, token_ids = loaded
    model, record = records[(name, torch.float32, algorithm)]
    assert not any(getattr(m, "pre_quant_scale", None) is not None for m in model.modules())
    with torch.no_grad():
        with reference_forward(model):
            assert torch.equal(record["logits"], model(token_ids).logits)
        # The kernels sum in another order; an activation that then lands across a rounding boundary of its
        # format moves by one step, so only the norm is close (each layer's bound: tests/backends/test_cpu_paths.py).
        ours = model(token_ids).logits
    assert (ours - record["logits"]).norm() <= 1e-3 * record["logits"].norm()


@pytest.mark.parametrize("name, dtype, algorithm", [(n, torch.bfloat16, "max") for n in COMPRESSED_TENSORS_QFORMATS] + [
    (n, torch.float32, "max") for n in NVFP4] + [("nvfp4_awq", torch.float32, SMOOTHED["nvfp4_awq"])])
def test_bfloat16_layers_differ_from_ours_by_bfloat16_rounding_only(name, dtype, algorithm, loaded):
    records, _ = loaded
    model, record = records[(name, dtype, algorithm)]
    modules = dict(model.named_modules())
    generator = torch.Generator().manual_seed(0)
    for layer, (x, theirs) in record["linears"].items():
        module = modules[layer]
        if not isinstance(module, QuantLinear):
            continue
        x = x.to(module.dtype)
        ulp = 1 + torch.randint(-1, 2, x.shape, generator=generator).float() * 2**-8  # +-1 bfloat16 ulp
        with torch.no_grad():
            ours, nudged = module(x).float(), module((x.float() * ulp).to(x.dtype)).float()
        difference = (ours - theirs.float()).norm() / ours.norm()
        rounding = (ours - nudged).norm() / ours.norm()
        assert difference <= 1.5 * rounding, (layer, difference.item(), rounding.item())
