"""A pre-quantized checkpoint with one bad scale value (NaN, Inf, zero, negative) or a scale of the wrong
dtype or shape fails to load with an error naming the tensor; a good one loads."""

import math

import pytest
import torch
from conftest import tiny_llama
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from hf_ptq_plugin import PTQConfig, export_checkpoint, quantize
from hf_ptq_plugin.hf.scale_checks import check_scale

LAYER = "model.layers.1.self_attn.k_proj"
BAD_VALUES = {"nan": math.nan, "inf": math.inf, "zero": 0.0, "negative": -0.5}
# (qformat, kv format, scale tensor) pairs covering every kind of scale
CASES = [("fp8", "fp8", f"{LAYER}.weight_scale"), ("fp8", "fp8", f"{LAYER}.input_scale"),
         ("fp8", "fp8", f"{LAYER}.k_scale"), ("fp8", "fp8", "model.layers.0.self_attn.v_proj.v_scale"),
         ("nvfp4", "none", f"{LAYER}.weight_scale"), ("nvfp4", "none", f"{LAYER}.weight_scale_2"),
         ("nvfp4", "none", f"{LAYER}.input_scale"),
         ("int4_awq", "none", f"{LAYER}.weight_scale"),
         ("int4_awq", "none", "model.layers.1.mlp.down_proj.pre_quant_scale")]
_CHECKPOINTS = {}


def checkpoint(tmp_path_factory, qformat, kv):
    """One saved tiny checkpoint per (qformat, kv), shared by the tests (copied before any change)."""
    if (qformat, kv) not in _CHECKPOINTS:
        torch.manual_seed(0)
        data = torch.randint(0, 320, (2, 16))
        algorithm = "awq_lite" if qformat == "int4_awq" else None  # AWQ: a pre_quant_scale to check
        config = PTQConfig(qformat=qformat, kv_cache_qformat=kv, algorithm=algorithm, pre_quant_scales="keep")
        model = quantize(tiny_llama(), config, lambda m: m(data))
        directory = tmp_path_factory.mktemp(f"{qformat}-{kv}")
        export_checkpoint(model, directory)
        _CHECKPOINTS[qformat, kv] = directory
    return _CHECKPOINTS[qformat, kv]


def copy_with(source, destination, key, change):
    destination.mkdir()
    for path in source.iterdir():
        if path.name != "model.safetensors":
            (destination / path.name).write_bytes(path.read_bytes())
    tensors = load_file(source / "model.safetensors")
    assert key in tensors, sorted(tensors)
    tensors[key] = change(tensors[key].clone())
    save_file(tensors, destination / "model.safetensors", metadata={"format": "pt"})
    return destination


def set_one(value):
    def change(tensor):
        dtype = tensor.dtype
        flat = tensor.float().flatten()
        flat[-1] = value
        return flat.reshape(tensor.shape).to(dtype)
    return change


@pytest.mark.parametrize("qformat,kv,key", CASES, ids=[f"{q}-{k.rsplit('.', 1)[1]}" for q, _, k in CASES])
@pytest.mark.parametrize("kind", list(BAD_VALUES))
def test_a_bad_scale_value_fails_to_load_naming_the_tensor(qformat, kv, key, kind, tmp_path, tmp_path_factory):
    source = checkpoint(tmp_path_factory, qformat, kv)
    if kind == "inf" and qformat == "nvfp4" and key.endswith(".weight_scale"):
        pytest.skip("FP8 E4M3 block scales have no Inf (the cast saturates to 448)")
    bad = copy_with(source, tmp_path / "bad", key, set_one(BAD_VALUES[kind]))
    with pytest.raises(ValueError, match=rf"{key}.*(not finite|not > 0)"):
        AutoModelForCausalLM.from_pretrained(bad)


def test_good_checkpoints_load(tmp_path_factory):
    for qformat, kv in {(q, k) for q, k, _ in CASES}:
        AutoModelForCausalLM.from_pretrained(checkpoint(tmp_path_factory, qformat, kv))


def test_e8m0_nan_byte_is_rejected_and_other_bytes_pass():
    check_scale("x.weight_scale", torch.tensor([0, 1, 127, 254], dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"'x.weight_scale'.*E8M0.*NaN.*found 255"):
        check_scale("x.weight_scale", torch.tensor([127, 255], dtype=torch.uint8))


def test_wrong_dtype_or_shape_is_rejected():
    with pytest.raises(ValueError, match=r"'x.input_scale': expected torch.float32 \[\]; found torch.float16 \[\]"):
        check_scale("x.input_scale", torch.tensor(1.0, dtype=torch.float16), ((), torch.float32))
    with pytest.raises(ValueError, match=r"'x.weight_scale': expected torch.float32 \[4\]; found torch.float32 \[3\]"):
        check_scale("x.weight_scale", torch.ones(3), ((4,), torch.float32))
