"""The same model saved twice, in two processes, gives byte-identical checkpoint files."""

import hashlib
import json
import struct
import subprocess
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from hf_ptq_plugin.export.deterministic import sort_metadata

SAVE = """
import sys
sys.path[:0] = [sys.argv[2]]
from conftest import tiny_llama
from hf_ptq_plugin import PTQConfig, export_checkpoint, quantize
model = quantize(tiny_llama(), PTQConfig(qformat="int4_awq", algorithm="max"))
model.save_pretrained(sys.argv[1] + "/unified")
export_checkpoint(model, sys.argv[1] + "/vllm", target="vllm")  # compressed-tensors
"""
TESTS = Path(__file__).resolve().parents[1]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_two_processes_write_the_same_bytes(tmp_path):
    for name in ("a", "b"):  # each process seeds the safetensors writer's hash map anew
        subprocess.run([sys.executable, "-c", SAVE, str(tmp_path / name), str(TESTS)], check=True, capture_output=True)
    for file in ("unified/model.safetensors", "unified/config.json", "unified/hf_quant_config.json",
                 "vllm/model.safetensors", "vllm/config.json"):
        assert sha256(tmp_path / "a" / file) == sha256(tmp_path / "b" / file), file


def raw_header(path: Path):
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    return length, json.loads(data[8:8 + length]), data[8 + length:]


def test_sorting_keeps_the_header_length_and_every_tensor(tmp_path):
    path = tmp_path / "t.safetensors"
    tensors = {"b": torch.arange(6, dtype=torch.float32).view(2, 3), "a": torch.ones(5, dtype=torch.uint8)}
    save_file(tensors, str(path), metadata={"z": "1", "producer": "x", "a_key": "é"})
    length, _, payload = raw_header(path)
    sort_metadata(path)
    new_length, header, new_payload = raw_header(path)
    assert (new_length, new_payload) == (length, payload)
    assert list(header["__metadata__"]) == ["a_key", "producer", "z"] and header["__metadata__"]["a_key"] == "é"
    with safe_open(str(path), framework="pt") as handle:
        assert all(torch.equal(handle.get_tensor(name), tensor) for name, tensor in tensors.items())
