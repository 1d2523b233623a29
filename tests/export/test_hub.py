"""push_to_hub through huggingface_hub's real HfApi against a local stand-in Hub (tests/hub_server.py)."""

import json

import huggingface_hub.constants
import pytest
import torch
import yaml
from conftest import tiny_llama, word_tokenizer
from hub_server import HubServer

from hf_ptq_plugin import PTQConfig, export_checkpoint, push_to_hub, quantize


@pytest.fixture
def hub(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    server = HubServer()
    yield server.hub
    server.stop()


@pytest.fixture
def model():
    torch.manual_seed(0)
    ids = torch.randint(0, 320, (2, 16))
    return quantize(tiny_llama(), PTQConfig(qformat="fp8"), forward_loop=lambda m: m(ids))


def comparable(name: str, data: bytes):
    """A file's bytes; for safetensors, (parsed header, tensor bytes): the writer orders the header's
    metadata entries differently from one save to the next, the tensors never."""
    if not name.endswith(".safetensors"):
        return data
    size = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + size]), data[8 + size:]


def front_matter(readme: bytes) -> dict:
    return yaml.safe_load(readme.decode().split("---")[1])


def test_one_commit_holds_every_checkpoint_file_byte_for_byte_and_the_card(hub, model, tmp_path):
    tokenizer = word_tokenizer()
    export_checkpoint(model, tmp_path / "local")
    tokenizer.save_pretrained(tmp_path / "local")
    local = {p.name: p.read_bytes() for p in (tmp_path / "local").iterdir()}

    info = push_to_hub(model, "me/tiny-fp8", tokenizer=tokenizer, token="hf_test", endpoint=hub.endpoint,
                       base_model="org/tiny")

    assert [c["name"] for c in hub.created] == ["tiny-fp8"] and len(hub.commits) == 1
    commit = hub.commits[0]
    assert sorted(commit.files) == sorted(local) and commit.deleted == []
    for name in local.keys() - {"README.md"}:
        assert comparable(name, commit.files[name]) == comparable(name, local[name]), name
    card = commit.files["README.md"]
    meta = front_matter(card)
    assert meta["base_model"] == "org/tiny" and meta["base_model_relation"] == "quantized"
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert {"fp8", "hf-ptq-plugin", "modelopt"} <= set(meta["tags"]) and "license" not in meta
    assert b'from_pretrained("me/tiny-fp8")' in card and b"vllm serve me/tiny-fp8" in card
    assert commit.revision == "main" and not commit.create_pr
    assert info.commit_url.startswith(hub.endpoint) and info.oid in info.commit_url
    assert all(r.headers.get("authorization") == "Bearer hf_test" for r in hub.requests)


def test_a_push_with_fewer_shards_deletes_the_stale_ones_and_nothing_else(hub, model):
    hub.repos["me/tiny"] = {"main": {".gitattributes": b"*.safetensors filter=lfs\n", "images/plot.png": b"png"}}
    push_to_hub(model, "me/tiny", endpoint=hub.endpoint, token="x", max_shard_size="200KB")
    first = set(hub.commits[0].files)
    shards = sorted(name for name in first if name.startswith("model-"))
    assert len(shards) > 1 and "model.safetensors.index.json" in first

    push_to_hub(model, "me/tiny", endpoint=hub.endpoint, token="x")

    second = hub.commits[1]
    assert sorted(second.deleted) == sorted(shards + ["model.safetensors.index.json"])
    assert "model.safetensors" in second.files
    remote = hub.repos["me/tiny"]["main"]
    assert sorted(remote) == sorted([".gitattributes", "images/plot.png"] + list(second.files))


def test_private_revision_create_pr_and_message_are_passed_through(hub, model):
    info = push_to_hub(model, "me/tiny", private=True, revision="fp8", create_pr=True, commit_message="add fp8",
                       token="x", endpoint=hub.endpoint)
    assert hub.created[0]["visibility"] == "private"
    assert [r.path for r in hub.requests if "/branch/" in r.path] == ["/api/models/me/tiny/branch/fp8"]
    commit = hub.commits[0]
    assert commit.revision == "fp8" and commit.create_pr and commit.header["summary"] == "add fp8"
    assert info.pr_url is not None and "fp8" not in hub.repos["me/tiny"]["main"]


def test_a_model_not_quantized_by_us_is_refused_before_any_request(hub):
    with pytest.raises(ValueError, match="not quantized by hf_ptq_plugin"):
        push_to_hub(tiny_llama(), "me/plain", endpoint=hub.endpoint, token="x")
    assert hub.requests == []


def test_transformers_push_to_hub_on_the_model_commits_our_checkpoint_and_card(hub, model, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hub.endpoint)  # as HF_ENDPOINT would set it
    info = model.push_to_hub("me/tiny", token="x", commit_message="from the model", commit_description="ignored",
                             private=True, tags=["mine"], max_shard_size="200KB")
    commit = hub.commits[0]
    meta = front_matter(commit.files["README.md"])
    assert {"fp8", "hf-ptq-plugin", "modelopt"} <= set(meta["tags"])  # our card, not transformers' empty one
    assert meta["hf_ptq_plugin"]["qformat"] == "fp8" and "hf_quant_config.json" in commit.files
    assert any(name.startswith("model-") for name in commit.files)  # max_shard_size reached the save
    assert commit.header["summary"] == "from the model" and hub.created[0]["visibility"] == "private"
    assert info.commit_url.startswith(hub.endpoint)
