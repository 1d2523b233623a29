"""transformers' Trainer on a quantized model without adapters: evaluate, predict, and what train touches.

Three ways to get a quantized model: quantize() in memory, from_pretrained of a saved unified
checkpoint, and quantizing while loading. Trainer's eval_loss must be the model's own mean
next-token cross-entropy, i.e. log(perplexity) on the same windows.
"""

import math

import pytest
import torch
from conftest import tiny_llama
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

from hf_ptq_plugin import PTQConfig, QuantLinear, quantize
from hf_ptq_plugin.evaluation import perplexity

WINDOWS, SEQ_LEN, VOCAB = 8, 16, 320
CONFIG = PTQConfig(qformat="int4_awq")


class Windows(torch.utils.data.Dataset):
    """Token windows as causal-LM examples (labels = inputs; the model shifts them)."""

    def __init__(self, ids: torch.Tensor):
        self.ids = ids

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def windows(seed=2) -> torch.Tensor:
    return torch.randint(0, VOCAB, (WINDOWS, SEQ_LEN), generator=torch.Generator().manual_seed(seed))


def trainer(model, tmp_path, train_dataset=None, **arguments) -> Trainer:
    args = TrainingArguments(output_dir=str(tmp_path / "trainer"), per_device_eval_batch_size=4, use_cpu=True,
                             report_to="none", disable_tqdm=True, save_strategy="no", **arguments)
    return Trainer(model=model, args=args, train_dataset=train_dataset)


def in_memory(tmp_path):
    calib = windows(seed=3)
    return quantize(tiny_llama(), CONFIG, forward_loop=lambda m: m(calib))


def from_disk(tmp_path):
    in_memory(tmp_path).save_pretrained(tmp_path / "quantized")
    return AutoModelForCausalLM.from_pretrained(tmp_path / "quantized")


def while_loading(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "src")
    return AutoModelForCausalLM.from_pretrained(tmp_path / "src", quantization_config=CONFIG)


@pytest.mark.parametrize("load", [in_memory, from_disk, while_loading])
def test_evaluate_gives_the_models_mean_cross_entropy(load, tmp_path):
    model = load(tmp_path)
    assert model.is_quantized and any(isinstance(m, QuantLinear) for m in model.modules())
    ids = windows()
    metrics = trainer(model, tmp_path).evaluate(Windows(ids))
    assert metrics["eval_loss"] == pytest.approx(math.log(perplexity(model, ids, batch_size=4)), rel=1e-5)


@pytest.mark.parametrize("load", [in_memory, from_disk, while_loading])
def test_predict_returns_the_models_logits(load, tmp_path):
    model = load(tmp_path)
    ids = windows()
    output = trainer(model, tmp_path).predict(Windows(ids))
    assert output.predictions.shape == (WINDOWS, SEQ_LEN, VOCAB)
    with torch.no_grad():
        expected = model(ids[:4]).logits
    torch.testing.assert_close(torch.as_tensor(output.predictions[:4]), expected, rtol=1e-5, atol=1e-5)


def test_training_without_adapters_moves_only_the_unquantized_parameters(tmp_path):
    model = in_memory(tmp_path)
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    params = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    assert params and not any(".self_attn." in n or ".mlp." in n for n in params)  # QuantLinear biases are frozen
    trainer(model, tmp_path, Windows(windows()), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-2).train()
    assert all(torch.equal(b, buffers[name]) for name, b in model.named_buffers())
    moved = [name for name, p in model.named_parameters() if name in params and not torch.equal(p, params[name])]
    assert "lm_head.weight" in moved and any("norm" in name for name in moved)
