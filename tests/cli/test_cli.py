"""The `hf-ptq` command line, end to end on a tiny Llama saved to tmp_path (in-process and as a subprocess)."""

import re
import subprocess
import sys

import huggingface_hub.constants
import pytest
import torch
from conftest import WORDS, tiny_llama, word_tokenizer
from hub_server import HubServer
from transformers import AutoModelForCausalLM

from hf_ptq_plugin import FORMATS, PTQConfig, calibrate, quantize
from hf_ptq_plugin.calibration import calibration_forward_loop
from hf_ptq_plugin.calibration.text import first_windows, read_text, tokenize
from hf_ptq_plugin.cli import main
from hf_ptq_plugin.evaluation import perplexity
from hf_ptq_plugin.export.engines import serve_command


@pytest.fixture
def files(tmp_path):
    source = tmp_path / "base"
    tiny_llama().save_pretrained(source)
    word_tokenizer().save_pretrained(source)
    calib, evaluation = tmp_path / "calib.txt", tmp_path / "eval.txt"
    calib.write_text(" ".join(WORDS[(i * 7) % len(WORDS)] for i in range(400)))
    evaluation.write_text(" ".join(WORDS[(i * 5 + 3) % len(WORDS)] for i in range(200)))
    return {"src": str(source), "calib": str(calib), "eval": str(evaluation), "tmp": tmp_path}


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def summary(text):
    """The printed summary table as {row name: value}."""
    return dict(re.split(r"\s{2,}", line, maxsplit=1) for line in text.strip().splitlines() if "  " in line)


CALIB_ARGS = ["--calib_size", "4", "--calib_seq", "16", "--batch_size", "2"]


def test_quantize_then_reload_gives_the_logits_of_the_same_quantization_in_memory(files, token_ids, capsys):
    out = files["tmp"] / "out"
    assert main(["quantize", files["src"], "--qformat", "fp8", "--kv_cache_qformat", "fp8", "--dataset", files["calib"],
                 *CALIB_ARGS, "--eval_text", files["eval"], "--eval_seq_len", "16", "--eval_windows", "3",
                 "--export_path", str(out)]) == 0
    printed = summary(capsys.readouterr().out)

    tokenizer = word_tokenizer()
    expected = AutoModelForCausalLM.from_pretrained(files["src"])
    windows = first_windows(tokenize(tokenizer, read_text(files["eval"])), 16, 3)
    before = perplexity(expected, windows, 2)
    quantize(expected, PTQConfig(qformat="fp8", kv_cache_qformat="fp8"),
             calibration_forward_loop(tokenizer, files["calib"], 4, 16, 2))
    after = perplexity(expected, windows, 2)
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(out), token_ids), logits(expected, token_ids))

    assert printed["format"].startswith("fp8 (FP8)") and printed["layers quantized"] == "14"
    assert printed["perplexity"].startswith(f"before {before:.4f}, after {after:.4f}")
    assert printed["calibration"] == "4 samples x <= 16 tokens from calib.txt (local file)"
    assert printed["export"] == f"{out} (modelopt: modelopt)"
    card = (out / "README.md").read_text()
    assert f"| before quantization | {before:.4f} |" in card and f"| quantized | {after:.4f} |" in card
    assert (out / "tokenizer.json").exists()


def test_low_memory_mode_quantizes_while_loading_then_calibrates(files, token_ids, capsys):
    out = files["tmp"] / "low"
    assert main(["quantize", "--pyt_ckpt_path", files["src"], "--qformat", "fp8", "--dataset", files["calib"],
                 *CALIB_ARGS, "--low_memory_mode", "--export_path", str(out)]) == 0
    expected = AutoModelForCausalLM.from_pretrained(files["src"], quantization_config=PTQConfig(qformat="fp8"))
    calibrate(expected, files["calib"], tokenizer=word_tokenizer(), calib_size=4, seq_len=16, batch_size=2)
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(out), token_ids), logits(expected, token_ids))


def test_no_sequential_calibrates_on_full_precision_block_outputs(files, token_ids):
    out = files["tmp"] / "awq"
    assert main(["quantize", files["src"], "--qformat", "int4_awq", "--algorithm", "awq_lite", "--no_sequential",
                 "--dataset", files["calib"], *CALIB_ARGS, "--export_path", str(out)]) == 0
    expected, sequential = (quantize(AutoModelForCausalLM.from_pretrained(files["src"]),
                                     PTQConfig(qformat="int4_awq", algorithm="awq_lite", sequential=flag),
                                     calibration_forward_loop(word_tokenizer(), files["calib"], 4, 16, 2))
                            for flag in (False, True))
    reloaded = logits(AutoModelForCausalLM.from_pretrained(out), token_ids)
    assert torch.equal(reloaded, logits(expected, token_ids))
    assert not torch.equal(reloaded, logits(sequential, token_ids))


def test_eval_prints_the_perplexity_of_the_model_and_the_baseline(files, capsys):
    quantize(AutoModelForCausalLM.from_pretrained(files["src"]), PTQConfig(qformat="int8_wo")).save_pretrained(
        files["tmp"] / "q")
    assert main(["eval", str(files["tmp"] / "q"), "--text", files["eval"], "--seq_len", "16", "--windows", "3",
                 "--baseline", files["src"]]) == 0
    printed = summary(capsys.readouterr().out)
    windows = first_windows(tokenize(word_tokenizer(), read_text(files["eval"])), 16, 3)
    model_ppl = perplexity(AutoModelForCausalLM.from_pretrained(files["tmp"] / "q"), windows)
    base_ppl = perplexity(AutoModelForCausalLM.from_pretrained(files["src"]), windows)
    assert printed["model perplexity"].startswith(f"{model_ppl:.4f}")
    assert printed["baseline perplexity"].startswith(f"{base_ppl:.4f}")
    assert printed["ratio"] == f"{model_ppl / base_ppl:.4f}"


def test_export_and_push_keep_the_measured_facts_in_the_card(files, monkeypatch, capsys, caplog):
    out, again = files["tmp"] / "out", files["tmp"] / "again"
    assert main(["quantize", files["src"], "--qformat", "int8_wo", "--eval_text", files["eval"], "--eval_seq_len", "16",
                 "--eval_windows", "2", "--export_path", str(out), "--base_model", "org/tiny"]) == 0
    assert main(["export", str(out), "--export_path", str(again), "--export_target", "modelopt"]) == 0
    measured = (out / "README.md").read_text().split("## Evaluation")[1].split("##")[0]
    assert "| quantized |" in measured and measured in (again / "README.md").read_text()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    server = HubServer()
    try:
        assert main(["push", str(again), "me/tiny-int8", "--endpoint", server.hub.endpoint, "--token", "x",
                     "--private"]) == 0
    finally:
        server.stop()
    commit = server.hub.commits[0]
    assert server.hub.created[0]["visibility"] == "private"
    assert {"model.safetensors", "config.json", "tokenizer.json", "README.md"} <= set(commit.files)
    card = commit.files["README.md"].decode()
    assert measured in card and "base_model: org/tiny" in card and 'from_pretrained("me/tiny-int8")' in card
    assert summary(capsys.readouterr().out)["to"].startswith(server.hub.endpoint)
    assert "--token is visible to other users in the process list; prefer the HF_TOKEN" in caplog.text


def test_an_export_whose_card_would_name_a_local_base_model_warns(files, caplog):
    common = ["quantize", files["src"], "--qformat", "int8_wo", "--algorithm", "max", "--export_path"]
    assert main(common + [str(files["tmp"] / "local")]) == 0
    assert f"the model card's base_model is the local path '{files['src']}'" in caplog.text
    caplog.clear()
    assert main(common + [str(files["tmp"] / "hub"), "--base_model", "org/tiny"]) == 0
    assert "base_model is the local path" not in caplog.text
    assert main(["export", str(files["tmp"] / "hub"), "--export_path", str(files["tmp"] / "again")]) == 0
    assert "base_model is the local path" not in caplog.text  # the card it was loaded from names org/tiny


def test_errors_are_one_line_naming_the_cause(files, capsys):
    assert main(["quantize", files["src"], "--qformat", "fp9"]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("hf-ptq: error: unknown qformat 'fp9'")
    assert all(name in err for name in FORMATS)
    assert main(["quantize", files["src"], "--qformat", "fp8"]) == 1
    assert "needs calibration data: pass --dataset" in capsys.readouterr().err
    assert main(["eval", str(files["tmp"] / "missing"), "--text", files["eval"]]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and f"no such model folder: '{files['tmp'] / 'missing'}'" in err


def test_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert all(command in out for command in ("quantize", "eval", "export", "push"))


def test_runs_as_a_subprocess(files, token_ids):
    out = files["tmp"] / "sub"
    run = subprocess.run([sys.executable, "-m", "hf_ptq_plugin", "quantize", files["src"], "--qformat", "int4_awq",
                          "--algorithm", "max", "--export_path", str(out)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert summary(run.stdout)["layers quantized"] == "14"
    expected = quantize(AutoModelForCausalLM.from_pretrained(files["src"]),
                        PTQConfig(qformat="int4_awq", algorithm="max"))
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(out), token_ids), logits(expected, token_ids))
    bad = subprocess.run([sys.executable, "-m", "hf_ptq_plugin", "quantize", files["src"], "--qformat", "int3"],
                         capture_output=True, text=True)
    assert bad.returncode == 1 and bad.stderr.strip().splitlines() == [bad.stderr.strip()]


def test_an_engine_target_gets_a_card_for_its_layout(files, capsys):
    out = files["tmp"] / "vllm"
    assert main(["quantize", files["src"], "--qformat", "int8_wo", "--export_path", str(out),
                 "--export_target", "vllm"]) == 0
    assert summary(capsys.readouterr().out)["export"] == f"{out} (vllm: compressed-tensors)"
    card = (out / "README.md").read_text()
    assert "compressed-tensors" in card.split("---")[1]  # a metadata tag
    vllm = card.split("### vLLM")[1].split("###")[0]
    assert serve_command("vllm", str(out), "int8_wo") in vllm


def test_a_switch_that_turns_something_off_does_not_claim_a_default_of_true(capsys):
    with pytest.raises(SystemExit):
        main(["quantize", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    no_sequential = help_text[help_text.index("--no_sequential SmoothQuant"):][:200]
    assert "default" not in no_sequential.split("--sequential")[0]


@pytest.mark.parametrize("argv, message", [
    (["eval", "M", "--text", "t.txt", "--seq_len", "0"], "argument --seq_len: 0 is below the minimum 2"),
    (["eval", "M", "--text", "t.txt", "--windows", "-2"], "argument --windows: -2 is below the minimum 1"),
    (["eval", "M", "--text", "t.txt", "--batch_size", "0"], "argument --batch_size: 0 is below the minimum 1"),
    (["quantize", "M", "--eval_seq_len", "1"], "argument --eval_seq_len: 1 is below the minimum 2"),
    (["quantize", "M", "--eval_windows", "-1"], "argument --eval_windows: -1 is below the minimum 1"),
    (["quantize", "M", "--calib_size", "abc"], "argument --calib_size: 'abc' is not an integer"),
])
def test_counts_out_of_range_are_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_a_hub_id_whose_host_does_not_resolve_is_read_from_the_cache_only(files, monkeypatch, capsys, caplog):
    import socket

    def no_dns(*args, **kwargs):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    assert main(["eval", "someorg/not-cached", "--text", files["eval"]]) == 1
    assert huggingface_hub.constants.HF_HUB_OFFLINE  # no request was retried: the cache was asked at once
    assert "huggingface.co does not resolve: reading 'someorg/not-cached' from the local Hub cache only" in caplog.text
    err = capsys.readouterr().err
    assert "Retrying" not in err and len(err.strip().splitlines()) == 1 and err.startswith("hf-ptq: error:")
