"""The model card written with every save: metadata, facts from the model, nothing invented."""

import json

import pytest
import yaml
from conftest import WORDS, tiny_llama, word_tokenizer
from huggingface_hub import ModelCard
from transformers import AutoModelForCausalLM

from hf_ptq_plugin import PTQConfig, export_checkpoint, quantize
from hf_ptq_plugin.calibration import calibration_forward_loop
from hf_ptq_plugin.evaluation import model_bytes
from hf_ptq_plugin.export.engines import ENGINES, engines_serving, serve_command
from hf_ptq_plugin.export.model_card import EvaluationRecord, unquantized_bytes, write_model_card


def read_card(directory):
    text = (directory / "README.md").read_text()
    _, meta, body = text.split("---\n", 2)
    return yaml.safe_load(meta), body


def source_checkpoint(tmp_path, readme=None):
    source = tmp_path / "base"
    tiny_llama().save_pretrained(source)
    word_tokenizer().save_pretrained(source)
    if readme is not None:
        (source / "README.md").write_text(readme)
    return source


def text_file(path, words=600):
    path.write_text(" ".join(WORDS[(i * 7) % len(WORDS)] for i in range(words)))
    return path


def test_metadata_names_the_source_inherits_its_license_and_tags_the_format(tmp_path):
    source = source_checkpoint(tmp_path, "---\nlicense: apache-2.0\nbase_model: someone/older\n---\n# Base\n")
    model = AutoModelForCausalLM.from_pretrained(source, quantization_config=PTQConfig(qformat="int8_wo"))
    model.save_pretrained(tmp_path / "out")
    meta, body = read_card(tmp_path / "out")
    assert meta["base_model"] == str(source) and meta["base_model_relation"] == "quantized"
    assert meta["license"] == "apache-2.0" and meta["library_name"] == "transformers"
    assert meta["pipeline_tag"] == "text-generation"
    assert {"int8_wo", "hf-ptq-plugin", "modelopt"} <= set(meta["tags"])
    assert "No calibration data" in body and "No evaluation was run" in body  # quantized while loading
    card = ModelCard.load(tmp_path / "out" / "README.md")  # what the Hub parses
    assert card.data.base_model == str(source) and card.data.base_model_relation == "quantized"
    assert card.data.license == "apache-2.0" and card.data.pipeline_tag == "text-generation"
    assert card.data.library_name == "transformers" and "int8_wo" in card.data.tags


def test_no_license_is_invented_and_base_model_can_be_overridden(tmp_path):
    model = quantize(AutoModelForCausalLM.from_pretrained(source_checkpoint(tmp_path)), PTQConfig(qformat="int8_wo"))
    write_model_card(model, tmp_path, base_model="org/base")
    meta, _ = read_card(tmp_path)
    assert "license" not in meta and meta["base_model"] == "org/base"


def test_body_states_calibration_data_sizes_and_bytes(tmp_path):
    calib = text_file(tmp_path / "calib.txt")
    reference = tiny_llama()
    loop = calibration_forward_loop(word_tokenizer(), str(calib), calib_size=5, seq_len=32, batch_size=2)
    model = quantize(tiny_llama(), PTQConfig(qformat="fp8"), forward_loop=loop)
    export_checkpoint(model, tmp_path / "out")
    meta, body = read_card(tmp_path / "out")
    assert unquantized_bytes(model) == model_bytes(reference)
    assert f"{model_bytes(reference):,} -> {model_bytes(model):,} bytes" in body
    assert "Data: calib.txt (local file); 5 samples of at most 32 tokens (160 tokens" in body
    assert str(tmp_path) not in body.split("## Use with transformers")[0]  # no local path in the facts
    assert meta["hf_ptq_plugin"]["calibration"] == {"source": "calib.txt (local file)", "samples": 5,
                                                    "max_seq_len": 32, "tokens": 160}
    assert "`fp8` (checkpoint `quant_algo`: `FP8`)" in body and "| quantized Linear layers | 14 |" in body
    assert "`lm_head`" in body  # the excluded module


def test_evaluation_appears_only_as_measured(tmp_path):
    model = quantize(tiny_llama(), PTQConfig(qformat="int8_wo"))
    write_model_card(model, tmp_path)
    assert "No evaluation was run" in read_card(tmp_path)[1]
    result = EvaluationRecord(data="book.txt (local file)", windows=3, seq_len=64, after=12.3456, before=12.0)
    write_model_card(model, tmp_path, evaluation=result)
    meta, body = read_card(tmp_path)
    assert "| before quantization | 12.0000 |" in body and "| quantized | 12.3456 |" in body
    assert meta["hf_ptq_plugin"]["evaluation"]["after"] == 12.3456


def test_a_reloaded_checkpoint_keeps_base_model_license_calibration_and_evaluation(tmp_path, token_ids):
    source = source_checkpoint(tmp_path, "---\nlicense: mit\n---\n")
    loop = calibration_forward_loop(word_tokenizer(), [" ".join(WORDS)] * 3, seq_len=16)
    model = quantize(AutoModelForCausalLM.from_pretrained(source), PTQConfig(qformat="fp8"), forward_loop=loop)
    evaluation = EvaluationRecord(data="eval.txt (local file)", windows=2, seq_len=16, after=9.5, before=9.25)
    model.save_pretrained(tmp_path / "q")
    write_model_card(model, tmp_path / "q", evaluation=evaluation)
    first, _ = read_card(tmp_path / "q")
    AutoModelForCausalLM.from_pretrained(tmp_path / "q").save_pretrained(tmp_path / "again")
    again, body = read_card(tmp_path / "again")
    assert again["base_model"] == str(source) and again["license"] == "mit"
    assert again["hf_ptq_plugin"] == first["hf_ptq_plugin"]
    assert "| quantized | 9.5000 |" in body


@pytest.mark.parametrize("qformat", ["int8_wo", "w4a16_nvfp4"])
def test_serving_section_follows_the_engine_table(qformat, tmp_path):
    model = quantize(tiny_llama(), PTQConfig(qformat=qformat))
    write_model_card(model, tmp_path, model_id="org/q")
    body = read_card(tmp_path)[1].split("## Serving")[1]
    serving = engines_serving(qformat)
    for engine in ENGINES:
        section = body.split("### ")[1 + ENGINES.index(engine)]
        if serving.get(engine) == "modelopt":
            assert serve_command(engine, "org/q", qformat) in section
        elif engine in serving:
            assert f"--export_target {engine}" in section and serve_command(engine, "q-" + engine, qformat) in section
        else:
            assert f"Does not accept `{qformat}`" in section


def test_a_checkpoint_made_by_modelopt_gets_not_recorded_rather_than_defaults(tmp_path):
    export_checkpoint(quantize(tiny_llama(), PTQConfig(qformat="int4_awq", algorithm="max")), tmp_path / "mo")
    config_path = tmp_path / "mo" / "config.json"
    config = json.loads(config_path.read_text())
    del config["quantization_config"]["ptq_config"]  # what ModelOpt writes: no record of our fields
    config_path.write_text(json.dumps(config))
    (tmp_path / "mo" / "README.md").unlink()
    write_model_card(AutoModelForCausalLM.from_pretrained(tmp_path / "mo"), tmp_path)
    meta, body = read_card(tmp_path)
    assert "| calibration algorithm | not recorded |" in body and "awq_lite" not in body
    assert "Not recorded: this model carries no record" in body and "calibration" not in meta["hf_ptq_plugin"]


def test_facts_survive_a_reload_even_without_a_base_model(tmp_path):
    loop = calibration_forward_loop(word_tokenizer(), [" ".join(WORDS)] * 2, seq_len=8)
    quantize(tiny_llama(), PTQConfig(qformat="fp8"), forward_loop=loop).save_pretrained(tmp_path / "q")
    AutoModelForCausalLM.from_pretrained(tmp_path / "q").save_pretrained(tmp_path / "again")
    again = read_card(tmp_path / "again")[0]
    assert again["hf_ptq_plugin"] == read_card(tmp_path / "q")[0]["hf_ptq_plugin"]
    assert "base_model" not in again  # not the quantized directory it was reloaded from


def test_a_model_saved_to_the_current_folder_is_titled_by_the_folder(tmp_path, monkeypatch):
    folder = tmp_path / "my-int8-model"
    folder.mkdir()
    monkeypatch.chdir(folder)
    quantize(tiny_llama(), PTQConfig(qformat="int8_wo", algorithm="max")).save_pretrained(".")
    _, body = read_card(folder)
    assert "# my-int8-model (int8_wo)" in body and 'from_pretrained(".")' in body
