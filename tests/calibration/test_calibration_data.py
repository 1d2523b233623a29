"""Calibration data: every accepted source, left padding, and padding kept out of statistics."""

import json

import datasets
import pytest
import torch
from conftest import WORDS, tiny_llama, word_tokenizer

from hf_ptq_plugin import PTQConfig, quantize
from hf_ptq_plugin.calibration.data import calibration_forward_loop, load_texts


@pytest.fixture
def tokenizer():
    return word_tokenizer()


def sentence(n, offset=0):
    return " ".join(WORDS[(i + offset) % len(WORDS)] for i in range(n))


def test_every_local_source_gives_the_same_texts(tmp_path):
    texts = [sentence(5), sentence(7, 3)]
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in texts))
    (tmp_path / "data.json").write_text(json.dumps([{"article": t} for t in texts]))
    datasets.Dataset.from_dict({"content": texts}).to_parquet(str(tmp_path / "data.parquet"))
    assert load_texts(texts) == texts
    assert load_texts(datasets.Dataset.from_dict({"text": texts})) == texts
    for name in ("data.jsonl", "data.json", "data.parquet"):
        assert load_texts(tmp_path / name) == texts, name
    assert load_texts(tmp_path) == texts * 3  # a folder: its files in name order


def test_bad_sources_name_the_problem(tmp_path, tokenizer):
    (tmp_path / "bad.jsonl").write_text(json.dumps({"body": "x"}))
    with pytest.raises(ValueError, match=r"no text column among \['body'\]"):
        load_texts(tmp_path / "bad.jsonl")
    with pytest.raises(ValueError, match="holds no non-empty text"):
        calibration_forward_loop(tokenizer, ["", "  "])
    (tmp_path / "short.txt").write_text(sentence(10))
    with pytest.raises(ValueError, match="has 10 tokens, fewer than calib_seq_len=64"):
        calibration_forward_loop(tokenizer, str(tmp_path / "short.txt"), seq_len=64)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="has no .txt/.json/.jsonl/.parquet files"):
        load_texts(tmp_path / "empty")
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9 au lait")
    with pytest.raises(ValueError, match=r"latin1.txt' is not UTF-8 text \(byte 3: invalid continuation byte\)"):
        load_texts(tmp_path / "latin1.txt")
    (tmp_path / "ints.json").write_text("[1, 2, 3]")
    with pytest.raises(ValueError, match=r"ints.json': records must be strings or objects with a text field, found"):
        load_texts(tmp_path / "ints.json")
    (tmp_path / "broken.jsonl").write_text('{"text": "a"}\n{oops\n')
    with pytest.raises(ValueError, match=r"broken.jsonl' \(line 2\) is not valid JSON"):
        load_texts(tmp_path / "broken.jsonl")


@pytest.mark.parametrize("ids, message", [
    (torch.zeros(4, 0, dtype=torch.long), r"non-empty \(N, S\) tensor, got shape \(4, 0\)"),
    (torch.rand(4, 16) * 100, r"must hold integer token ids, got dtype torch.float32"),
])
def test_bad_token_tensors_name_the_problem(ids, message):
    with pytest.raises(ValueError, match=message):
        calibration_forward_loop(None, ids)


def test_token_ids_need_no_tokenizer():
    ids = torch.arange(1, 13).view(3, 4)
    loop = calibration_forward_loop(None, ids, seq_len=3, batch_size=2)
    assert [b["input_ids"].tolist() for b in loop.batches] == [[[1, 2, 3], [5, 6, 7]], [[9, 10, 11]]]


def test_samples_are_truncated_and_left_padded_in_order(tokenizer):
    loop = calibration_forward_loop(tokenizer, [sentence(3), sentence(9), sentence(4)], calib_size=2, seq_len=6,
                                    batch_size=2)
    (batch,) = loop.batches
    assert batch["attention_mask"].tolist() == [[0, 0, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1]]
    assert batch["input_ids"][0, :3].tolist() == [0, 0, 0]
    assert batch["input_ids"][1].tolist() == tokenizer(sentence(6))["input_ids"]


def test_a_text_file_is_cut_into_windows_spread_over_it(tmp_path, tokenizer):
    (tmp_path / "book.txt").write_text(sentence(100))
    loop = calibration_forward_loop(tokenizer, str(tmp_path / "book.txt"), calib_size=3, seq_len=10)
    ids = torch.cat([b["input_ids"] for b in loop.batches])
    assert ids.shape == (3, 10) and bool(loop.batches[0]["attention_mask"].all())


def model_with_loud_padding():
    """The pad token's embedding is one spike: after RMSNorm it is sqrt(hidden) in one channel, far
    above any real token's activations, so a statistic that counted padding would show it."""
    model = tiny_llama()
    model.model.embed_tokens.weight.data[0] = 0.0
    model.model.embed_tokens.weight.data[0, 5] = 1.0
    return model


def _fp8_input_scales(model, loop):
    quantize(model, PTQConfig(qformat="fp8", kv_cache_qformat="fp8"), forward_loop=loop)
    layer = model.model.layers[0]
    return layer.self_attn.q_proj.input_scale, layer.self_attn.k_proj.k_scale


def test_padding_never_enters_the_statistics(tokenizer):
    texts = [sentence(3), sentence(12, 5), sentence(7, 2)]


    padded = _fp8_input_scales(model_with_loud_padding(), calibration_forward_loop(tokenizer, texts, batch_size=3))
    alone = _fp8_input_scales(model_with_loud_padding(), calibration_forward_loop(tokenizer, texts, batch_size=1))
    for a, b in zip(padded, alone):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=0)


def test_awq_streaming_accepts_padded_batches(tokenizer):
    model = model_with_loud_padding()
    loop = calibration_forward_loop(tokenizer, [sentence(3), sentence(12, 5)], batch_size=2)
    quantize(model, PTQConfig(qformat="w4a8_awq"), forward_loop=loop)
    reference = model_with_loud_padding()
    quantize(reference, PTQConfig(qformat="w4a8_awq"), forward_loop=calibration_forward_loop(
        tokenizer, [sentence(3), sentence(12, 5)], batch_size=1))
    torch.testing.assert_close(model.model.layers[0].self_attn.q_proj.input_scale,
                               reference.model.layers[0].self_attn.q_proj.input_scale, rtol=1e-4, atol=0)
