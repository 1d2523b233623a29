"""from_pretrained(full-precision dir, quantization_config=PTQConfig(...)): quantized while loading."""

import logging
import subprocess
import sys

import pytest
import torch
import transformers.core_model_loading as loading
from conftest import tiny_llama
from torch import nn
from transformers import AutoModelForCausalLM

import hf_ptq_plugin.hf.quantize_on_load as load_time
from hf_ptq_plugin import FORMATS, PTQConfig, QuantLinear, get_format
from hf_ptq_plugin.numerics import quantize_weight
from hf_ptq_plugin.numerics import weights as weights_module
from hf_ptq_plugin.numerics.weights import quantize_weight_in_row_blocks

WEIGHT_ONLY = [name for name, fmt in FORMATS.items() if not fmt.needs_calibration_data]


def checkpoint(tmp_path, name="fp8", dtype=torch.float32):
    directory = tmp_path / "src"
    model = tiny_llama(kv_heads=4) if name == "fp8_pb_wo" else tiny_llama()
    model.to(dtype).save_pretrained(directory)
    return directory


def run(model, ids):
    with torch.no_grad():
        return model(ids).logits


def weight_tensors(model):
    return {f"{n}.{b}": t for n, m in model.named_modules() if isinstance(m, QuantLinear)
            for b, t in m.weight_buffers().items()}


@pytest.mark.parametrize("name", list(FORMATS))
def test_quantizing_while_loading_leaves_static_scales_to_calibration(name, tmp_path, token_ids):
    """The tensors are quantize()'s: tests/calibration/test_weight_sources.py."""
    config = PTQConfig(qformat=name, algorithm="max")
    loaded = AutoModelForCausalLM.from_pretrained(checkpoint(tmp_path, name), quantization_config=config)
    assert len(weight_tensors(loaded)) >= 28
    assert type(loaded.lm_head) is nn.Linear and not loaded.hf_quantizer.pre_quantized
    assert loaded.config.quantization_config.qformat == name and loaded.quantization_method == "modelopt"
    assert all(m.input_calibrated != FORMATS[name].needs_calibration_data
               for m in loaded.modules() if isinstance(m, QuantLinear))
    assert torch.isfinite(run(loaded, token_ids)).all()


@pytest.mark.parametrize("name", WEIGHT_ONLY)
def test_weight_only_formats_are_complete_after_loading_and_round_trip(name, tmp_path, token_ids):
    model = AutoModelForCausalLM.from_pretrained(checkpoint(tmp_path, name),
                                                 quantization_config=PTQConfig(qformat=name))
    model.save_pretrained(tmp_path / "q")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert reloaded.hf_quantizer.pre_quantized
    assert torch.equal(run(reloaded, token_ids), run(model, token_ids))


@pytest.mark.parametrize("name", list(FORMATS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantizing_in_row_blocks_gives_the_same_bits_as_the_whole_tensor(name, dtype, monkeypatch):
    monkeypatch.setattr(weights_module, "CHUNK_ELEMENTS", 128 * 256)  # blocks of 128 rows
    torch.manual_seed(0)
    w = (torch.randn(384, 256) * torch.linspace(0.01, 0.2, 384)[:, None]).to(dtype)  # rows of different ranges
    fmt = get_format(name)
    group_size = QuantLinear(256, 384, False, fmt, dtype=dtype, device="meta").group_size
    given_scales = [None]
    if weights_module._takes_weight_scale(fmt):
        given_scales.append(quantize_weight(w * 0.9, fmt, group_size)["weight_scale"])  # as GPTQ hands over
    for amax in (None, torch.tensor(1.5)):
        for weight_scale in given_scales:
            expected = quantize_weight(w, fmt, group_size, amax, weight_scale)
            found = quantize_weight_in_row_blocks(w, fmt, group_size, amax, weight_scale)
            assert found.keys() == expected.keys()
            assert all(torch.equal(found[k], expected[k]) and found[k].dtype == expected[k].dtype for k in expected)


def test_each_weight_is_quantized_right_after_it_is_read(tmp_path, monkeypatch):
    events = []
    read, convert = loading._materialize_copy, load_time.QuantizeOnLoad.convert

    def logged_read(tensor, device=None, dtype=None):
        out = read(tensor, device, dtype)
        events.append(("read", tuple(out.shape)))
        return out

    def logged_convert(self, input_dict, **kwargs):
        value = next(iter(input_dict.values()))
        events.append(("quantize", tuple((value[0] if isinstance(value, list) else value).shape)))
        return convert(self, input_dict, **kwargs)

    monkeypatch.setattr(loading, "_materialize_copy", logged_read)
    monkeypatch.setattr(load_time.QuantizeOnLoad, "convert", logged_convert)
    AutoModelForCausalLM.from_pretrained(checkpoint(tmp_path), quantization_config=PTQConfig(qformat="int8_wo"))
    quantized = [i for i, (kind, _) in enumerate(events) if kind == "quantize"]
    assert len(quantized) == 14
    # No read-ahead: the event before each quantization is the read of that very tensor.
    assert all(events[i - 1] == ("read", events[i][1]) for i in quantized)


def test_bf16_checkpoint_quantizes_in_bf16_with_shared_fused_scales(tmp_path, token_ids):
    """The tensors are quantize()'s: tests/calibration/test_weight_sources.py (llama_bf16)."""
    config = PTQConfig(qformat="w4a16_nvfp4")
    loaded = AutoModelForCausalLM.from_pretrained(checkpoint(tmp_path, dtype=torch.bfloat16),
                                                  quantization_config=config)
    assert loaded.model.layers[0].mlp.up_proj.dtype == torch.bfloat16
    attention = loaded.model.layers[1].self_attn
    assert torch.equal(attention.q_proj.weight_scale_2, attention.v_proj.weight_scale_2)
    assert run(loaded, token_ids).dtype == torch.bfloat16


def test_exclusions_and_the_resolved_config(tmp_path):
    config = PTQConfig(qformat="int4_awq", exclude_modules=["*.mlp.down_proj"])
    model = AutoModelForCausalLM.from_pretrained(checkpoint(tmp_path), quantization_config=config)
    assert type(model.model.layers[0].mlp.down_proj) is nn.Linear
    assert isinstance(model.model.layers[0].mlp.up_proj, QuantLinear)
    resolved = model.config.quantization_config
    assert (resolved.group_size, resolved.algorithm) == (128, "max") and config.group_size is None


def test_an_algorithm_that_needs_data_says_max_is_used_instead(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        AutoModelForCausalLM.from_pretrained(checkpoint(tmp_path), quantization_config=PTQConfig(qformat="int4_awq"))
    assert "'gptq' needs calibration data" in caplog.text and "quantized with 'max'" in caplog.text


def test_a_fresh_process_registers_at_import_and_refuses_to_save_uncalibrated(tmp_path):
    source = checkpoint(tmp_path)
    script = ("import sys, hf_ptq_plugin\n"
              "from transformers import AutoModelForCausalLM\n"
              "m = AutoModelForCausalLM.from_pretrained(sys.argv[1], "
              "quantization_config=hf_ptq_plugin.PTQConfig('fp8'))\n"
              "try:\n    m.save_pretrained(sys.argv[2])\nexcept ValueError as e:\n    print('REFUSED', e)\n")
    out = subprocess.run([sys.executable, "-c", script, str(source), str(tmp_path / "out")], capture_output=True,
                         text=True, check=True)
    assert out.stdout.startswith("REFUSED") and "calibrate" in out.stdout
    assert not (tmp_path / "out").exists()
