"""Restoring a block's full-precision weights from the source checkpoint costs no anonymous memory.

At load time, calibration re-reads each block's source weights (`sources.restore_full_precision`).
A CPU weight already in the layer's dtype stays the safetensors memory map: file-backed pages, which
a memory limit on the process's anonymous memory does not count and the kernel can drop. The map is
private: a write to the restored weight (producer folding scales it in place) never reaches the file.
"""

import re

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from hf_ptq_plugin import FORMATS
from hf_ptq_plugin.calibration.sources import CheckpointWeights, restore_full_precision
from hf_ptq_plugin.modules.quant_linear import QuantLinear

ROWS, COLUMNS = 2048, 4096  # 16 MiB of bf16


def rss_anon_bytes() -> int:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("RssAnon:"))
    return int(line.split()[1]) * 1024


class Holder(nn.Module):
    def __init__(self, dtype):
        super().__init__()
        self.proj = QuantLinear(COLUMNS, ROWS, bias=True, fmt=FORMATS["int4_awq"], group_size=128, dtype=dtype)


def source_checkpoint(tmp_path):
    weight = torch.randn(ROWS, COLUMNS).to(torch.bfloat16)
    save_file({"proj.weight": weight}, str(tmp_path / "model.safetensors"))
    return weight, CheckpointWeights(files=[str(tmp_path / "model.safetensors")], algorithm="awq_lite")


def test_a_restored_weight_in_the_checkpoint_dtype_is_the_file_mapping(tmp_path):
    weight, source = source_checkpoint(tmp_path)
    model = Holder(torch.bfloat16)
    model.proj.bias.copy_(torch.arange(ROWS, dtype=torch.bfloat16))
    source.locations  # the header is read before measuring
    before = rss_anon_bytes()
    restored = restore_full_precision(model, {"proj": model.proj}, source)["proj"]
    assert restored.weight.sum().item() == weight.sum().item()  # every page read
    grown = rss_anon_bytes() - before
    assert grown < weight.nbytes / 8, f"restoring a {weight.nbytes} B weight grew anonymous memory by {grown} B"
    assert model.proj is restored and torch.equal(restored.weight, weight)
    assert torch.equal(restored.bias, torch.arange(ROWS, dtype=torch.bfloat16))
    assert not restored.weight.requires_grad

    restored.weight.mul_(2)  # as producer folding scales a weight in place
    assert torch.equal(load_file(str(tmp_path / "model.safetensors"))["proj.weight"], weight)


def test_a_restored_weight_in_another_dtype_is_cast_as_the_loader_casts(tmp_path):
    weight, source = source_checkpoint(tmp_path)
    model = Holder(torch.float32)
    restored = restore_full_precision(model, {"proj": model.proj}, source)["proj"]
    assert restored.weight.dtype == torch.float32 and torch.equal(restored.weight, weight.float())


def test_a_source_weight_of_another_shape_is_refused_with_both_shapes(tmp_path):
    save_file({"proj.weight": torch.zeros(ROWS, 64, dtype=torch.bfloat16)}, str(tmp_path / "model.safetensors"))
    source = CheckpointWeights(files=[str(tmp_path / "model.safetensors")], algorithm="awq_lite")
    model = Holder(torch.bfloat16)
    with pytest.raises(ValueError, match=re.escape(f"expected shape [{ROWS}, {COLUMNS}], found [{ROWS}, 64]")):
        restore_full_precision(model, {"proj": model.proj}, source)
