"""PEFT LoRA on a quantized model: wrapping, gradients, Trainer, adapter save/load, merge."""

import copy
import subprocess
import sys

import pytest
import torch
from conftest import tiny_llama
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora.model import LoraModel
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

from hf_ptq_plugin import FORMATS, PTQConfig, QuantLinear, quantize
from hf_ptq_plugin.hf.lora import QuantLoraLinear
from hf_ptq_plugin.hf.peft_hook import register_with_peft
from hf_ptq_plugin.modules.weight_delta import keeps_grid

TARGETS = ["q_proj", "v_proj", "down_proj"]
VOCAB = 320


def ids(seed=2, rows=8, seq_len=16) -> torch.Tensor:
    return torch.randint(0, VOCAB, (rows, seq_len), generator=torch.Generator().manual_seed(seed))


def quantized(qformat="int4_awq", algorithm=None, pre_quant_scales="fold"):
    calib = ids(seed=3)
    model = tiny_llama(kv_heads=4) if qformat == "fp8_pb_wo" else tiny_llama()  # fp8_pb_wo: 128-row tiles
    config = PTQConfig(qformat=qformat, algorithm=algorithm, pre_quant_scales=pre_quant_scales)
    return quantize(model, config, forward_loop=lambda m: m(calib))


def lora(model, seed=0, **overrides) -> PeftModel:
    """Adapters with B random too (init_lora_weights=False), so they change the output from the start."""
    torch.manual_seed(seed)
    config = dict(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False)
    return get_peft_model(model, LoraConfig(**{**config, **overrides}))


def shrink_adapters(model: PeftModel, fraction: float) -> PeftModel:
    """Scale each adapter's B so its update's largest element is `fraction` of the base weight's:
    a trained adapter's size, where a random one would dwarf the weights it adds to."""
    with torch.no_grad():
        for layer in (m for m in model.modules() if isinstance(m, QuantLoraLinear)):
            largest = layer.get_delta_weight("default").abs().max()
            layer.lora_B["default"].weight.mul_(fraction * layer.base_layer.dequantized_weight().abs().max() / largest)
    return model


def logits(model, x) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=x).logits


def adapter_grads(peft_model, x) -> dict:
    peft_model(input_ids=x, labels=x).loss.backward()
    return {n: p.grad.clone() for n, p in peft_model.named_parameters() if p.requires_grad}


def test_lora_wraps_every_targeted_quant_linear_and_trains_only_the_adapters():
    model = lora(quantized())
    wrapped = [m for m in model.modules() if isinstance(m, QuantLoraLinear)]
    assert len(wrapped) == 2 * len(TARGETS) and all(isinstance(m.base_layer, QuantLinear) for m in wrapped)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    x = ids()
    model(input_ids=x, labels=x).loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_" in n)
    assert all(b.grad is None for b in model.buffers())


def test_adapter_gradients_equal_those_over_the_dense_dequantized_model():
    # Weight-only INT4 in fp32 computes x @ W^T with the dequantized W, as the dense model does;
    # AWQ's pre_quant_scale is folded into the dense weight and multiplies the quantized layer's input.
    model = quantized(algorithm="awq_lite", pre_quant_scales="keep")
    assert any(m.pre_quant_scale is not None for m in model.modules() if isinstance(m, QuantLinear))
    dense = copy.deepcopy(model).dequantize()
    x = ids()
    found, expected = adapter_grads(lora(model), x), adapter_grads(lora(dense), x)
    assert found.keys() == expected.keys() and len(found) == 4 * len(TARGETS)
    for name in found:
        torch.testing.assert_close(found[name], expected[name], rtol=1e-4, atol=1e-6)


def test_trainer_trains_the_adapters_and_leaves_the_quantized_base_alone(tmp_path):
    model = lora(quantized(), init_lora_weights=True)  # PEFT's default init: the adapters start as a no-op
    base = {n: b.clone() for n, b in model.named_buffers()}
    x = ids(rows=8)
    dataset = [{"input_ids": row, "labels": row} for row in x]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=8,
                             learning_rate=3e-3, use_cpu=True, report_to="none", disable_tqdm=True, save_strategy="no")
    trainer = Trainer(model=model, args=args, train_dataset=dataset, eval_dataset=dataset)
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    assert trainer.evaluate()["eval_loss"] < before - 0.05
    assert all(torch.equal(b, base[n]) for n, b in model.named_buffers())


def test_saved_adapters_reload_on_the_quantized_base_to_identical_logits(tmp_path):
    quantized().save_pretrained(tmp_path / "base")
    model = lora(AutoModelForCausalLM.from_pretrained(tmp_path / "base"))
    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "adapter")
    assert sum(isinstance(m, QuantLoraLinear) for m in reloaded.modules()) == 2 * len(TARGETS)
    x = ids()
    assert torch.equal(logits(reloaded, x), logits(model, x))
    with reloaded.disable_adapter():
        assert not torch.equal(logits(reloaded, x), logits(model, x))  # the adapters do change the output


@pytest.mark.parametrize("name", list(FORMATS))
def test_merging_a_zero_adapter_keeps_every_weight_and_scale(name):
    model = lora(quantized(name, "max"), init_lora_weights=True)  # B = 0
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    weights = {n: m.dequantized_weight() for n, m in layers.items()}
    scales = {n: {k: v.clone() for k, v in m.weight_buffers().items() if k != "weight"} for n, m in layers.items()}
    model.merge_and_unload()
    for n, m in layers.items():  # values, not codes: NVFP4's -0 code may come back as +0
        assert torch.equal(m.dequantized_weight(), weights[n])
        assert not keeps_grid(m.fmt) or all(torch.equal(m.weight_buffers()[k].float(), v.float())
                                            for k, v in scales[n].items())


@pytest.mark.parametrize("name, algorithm", [(n, "max") for n, f in FORMATS.items() if keeps_grid(f)]
                         + [("int4_awq", "awq_lite")])  # AWQ: the update is divided by pre_quant_scale
def test_merge_rounds_the_update_onto_the_layers_grid(name, algorithm):
    model = shrink_adapters(lora(quantized(name, algorithm)), 0.1)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    base = layer.base_layer
    w, scales = base.dequantized_weight(), {k: v.clone() for k, v in base.weight_buffers().items() if k != "weight"}
    delta = layer.get_delta_weight("default").float()
    if base.pre_quant_scale is not None:
        delta = delta / base.pre_quant_scale.float()
    layer.merge()
    merged = base.dequantized_weight()
    assert all(torch.equal(base.weight_buffers()[k], v) for k, v in scales.items())  # the scales are kept
    error, unmerged_error = (merged - (w + delta)).abs(), delta.abs()
    if name == "w4a8_awq":  # INT4 code x ratio is rounded to FP8: the nearest code may not give the nearest value
        assert error.mean() < unmerged_error.mean()
    else:
        assert (error <= unmerged_error + 1e-6).all()  # the nearest grid point is never farther than W
    assert not torch.equal(merged, w)
    layer.unmerge()
    assert torch.equal(base.dequantized_weight(), w)


def test_merge_and_unload_gives_a_quantized_model_that_saves_and_reloads(tmp_path):
    model = shrink_adapters(lora(quantized("int8_wo")), 0.1)  # a fine grid: the merge keeps most of the adapter
    x = ids()
    with_adapter = logits(model, x)
    with model.disable_adapter():
        without = logits(model, x)
    merged = model.merge_and_unload()
    assert all(type(m) is not QuantLoraLinear for m in merged.modules())
    found = logits(merged, x)
    assert (found - with_adapter).abs().mean() < 0.25 * (without - with_adapter).abs().mean()
    merged.save_pretrained(tmp_path / "merged")
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "merged"), x), found)


@pytest.mark.parametrize("option", [{"use_dora": True}, {"lora_bias": True}, {"fan_in_fan_out": True}])
def test_unsupported_lora_options_raise_a_value_error_naming_them(option):
    with pytest.raises(ValueError, match=next(iter(option))):
        lora(quantized(), **option)


def test_import_registers_with_peft_only_once_peft_is_imported():
    code = ("import importlib.util, sys, hf_ptq_plugin; assert 'peft' not in sys.modules; "
            "assert importlib.util.find_spec('peft'); import peft; "  # a probe first, as transformers makes
            "from peft.tuners.lora.model import LoraModel; print(LoraModel._create_new_module.dispatches_quant_linear)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "True"
    assert register_with_peft() == "registered"  # here PEFT is imported already: at once, and idempotent
    assert LoraModel._create_new_module.dispatches_quant_linear
