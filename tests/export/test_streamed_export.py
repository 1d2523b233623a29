"""The compressed-tensors export written a tensor at a time (`streamed_safetensors.write_streamed`,
`compressed_tensors.Conversion`): files safetensors reads back bit for bit, shards with their index,
at most one layer converted at a time, and a tied model stored under its input embedding's name
and loaded back by transformers + compressed-tensors to our logits."""

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama_config
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

from hf_ptq_plugin import PTQConfig, quantize
from hf_ptq_plugin.export import compressed_tensors as ct
from hf_ptq_plugin.export.streamed_safetensors import DTYPE_NAMES, write_streamed
from hf_ptq_plugin.modules.quant_linear import reference_forward

SCRIPT = Path(__file__).with_name("load_without_plugin.py")


def test_a_streamed_file_reads_back_bit_for_bit_in_every_dtype(tmp_path):
    torch.manual_seed(0)
    tensors = {f"t.{str(dtype)[6:]}": torch.randn(3, 5).mul(50).to(dtype) for dtype in DTYPE_NAMES}
    tensors["scalar"] = torch.tensor(2.5)
    tensors["empty"] = torch.zeros(0, 4)
    specs = {name: t.to("meta") for name, t in tensors.items()}
    produced = []
    write_streamed(tmp_path / "x.safetensors", specs, lambda name: produced.append(name) or tensors[name],
                   {"b": "2", "a": "1"})
    assert produced == sorted(tensors)  # each asked for once, in header order
    with safe_open(tmp_path / "x.safetensors", "pt") as handle:
        assert handle.metadata() == {"a": "1", "b": "2"}
        for name, tensor in tensors.items():
            read = handle.get_tensor(name)
            assert read.dtype == tensor.dtype and read.shape == tensor.shape
            assert torch.equal(read.reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8))
    header_length = struct.unpack("<Q", (tmp_path / "x.safetensors").read_bytes()[:8])[0]
    assert header_length % 8 == 0


def test_a_tensor_that_safetensors_cannot_store_is_refused_by_name(tmp_path):
    with pytest.raises(ValueError, match=r"'z'.*complex64.*storable"):
        write_streamed(tmp_path / "x.safetensors", {"z": torch.zeros(2, dtype=torch.complex64)}, lambda n: None)


def test_a_produced_tensor_unlike_its_header_is_an_error(tmp_path):
    with pytest.raises(RuntimeError, match="'w'.*header"):
        write_streamed(tmp_path / "x.safetensors", {"w": torch.zeros(2, 3)}, lambda n: torch.zeros(3, 2))


def _quantized(qformat="int4_awq", tied=False):
    torch.manual_seed(0)
    ids = torch.randint(0, 300, (2, 16))
    config = tiny_llama_config()
    config.tie_word_embeddings = tied
    model = LlamaForCausalLM(config).eval()
    return quantize(model, PTQConfig(qformat=qformat), forward_loop=lambda m: m(ids)), ids


def test_shards_hold_what_the_whole_conversion_holds_converting_one_layer_at_a_time(tmp_path, monkeypatch):
    model, _ = _quantized()
    layers = {name: m.fmt for name, m in model.named_modules() if hasattr(m, "fmt")}
    expected = ct.convert_state_dict(model.state_dict(), layers)
    largest_pending = []
    take = ct.Conversion.take

    def watched_take(self, key):
        value = take(self, key)
        largest_pending.append(len({self.owner[k] for k in self.pending}))
        return value

    monkeypatch.setattr(ct.Conversion, "take", watched_take)
    ct.save_compressed_tensors(model, tmp_path / "out", model.ptq_config, max_shard_size="200KB")
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and index["metadata"]["quant_method"] == "compressed-tensors"
    written = {}
    for file in files:
        written.update(load_file(tmp_path / "out" / file))
    assert written.keys() == expected.keys()
    assert all(torch.equal(written[k], expected[k]) for k in expected)
    assert max(largest_pending) <= 1  # a layer's leftovers wait for the next shard, never two layers'


def test_a_tied_model_is_stored_under_its_embedding_and_loads_without_the_plugin(tmp_path):
    model, ids = _quantized("fp8", tied=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ct.save_compressed_tensors(model, tmp_path / "out", model.ptq_config)
    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as handle:
        keys = set(handle.keys())
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys
    torch.save(ids, tmp_path / "ids.pt")
    subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "ids.pt"), str(tmp_path / "out"),
                    str(tmp_path / "record.pt")], check=True, capture_output=True, timeout=300)
    record = torch.load(tmp_path / "record.pt")
    with torch.no_grad(), reference_forward(model):  # F.linear on the dense weights, as transformers runs them
        ours = model(ids).logits
    assert record["quantizer"] == "CompressedTensorsHfQuantizer" and not record["plugin_imported"]
    assert torch.equal(record["logits"], ours)
