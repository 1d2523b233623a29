"""`hf-ptq quantize --qformat a,b --auto_quantize_bits N`: the search from the command line, its export and frontier."""

import csv
import json
import re

import pytest
import test_cli
import torch
from conftest import word_tokenizer
from test_cli import CALIB_ARGS, logits, summary
from transformers import AutoModelForCausalLM

from hf_ptq_plugin import auto_quantize
from hf_ptq_plugin.calibration import calibration_forward_loop
from hf_ptq_plugin.calibration.data import CalibrationLoop
from hf_ptq_plugin.cli import main

files = test_cli.files  # the same fixture: a tiny Llama with its tokenizer, calibration and evaluation texts
SEARCH = ["--qformat", "fp8,int4_awq", "--auto_quantize_bits", "6", "--auto_quantize_score_size", "2"]


def test_the_search_exports_what_the_library_call_builds(files, token_ids, capsys):
    out = files["tmp"] / "mixed"
    assert main(["quantize", files["src"], *SEARCH, "--algorithm", "max", "--dataset", files["calib"], *CALIB_ARGS,
                 "--export_path", str(out)]) == 0
    printed = summary(capsys.readouterr().out)

    expected = AutoModelForCausalLM.from_pretrained(files["src"])
    loop = calibration_forward_loop(word_tokenizer(), files["calib"], 4, 16, 2)
    score_loop = CalibrationLoop(loop.batches[:1], source=loop.source)  # 2 samples = the first batch of 2
    _, result = auto_quantize(expected, ["fp8", "int4_awq"], 6.0, loop, score_loop=score_loop,
                              algorithms={"fp8": "max", "int4_awq": "max"})
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(out), token_ids), logits(expected, token_ids))
    quantization = json.loads((out / "hf_quant_config.json").read_text())["quantization"]
    assert quantization["quant_algo"] == "MIXED_PRECISION"
    assert {name: layer["quant_algo"] for name, layer in quantization["quantized_layers"].items()} == {
        name: {"fp8": "FP8", "int4_awq": "W4A16_AWQ"}[q] for name, q in result.layer_qformats.items()}
    assert printed["AutoQuantize"].startswith(f"{result.effective_bits:.3f} effective bits (budget 6.0")
    counts = {q: list(result.choice.values()).count(q) for q in set(result.choice.values())}
    assert printed["groups per format"] == ", ".join(f"{q} {n}" for q, n in sorted(counts.items()))


def test_the_frontier_is_written_from_one_search(files, capsys):
    stem = files["tmp"] / "plots" / "frontier"
    assert main(["quantize", files["src"], *SEARCH, "--dataset", files["calib"], *CALIB_ARGS,
                 "--eval_text", files["eval"], "--eval_seq_len", "16", "--eval_windows", "3",
                 "--auto_quantize_frontier", "4,6,8,16", "--frontier_path", str(stem)]) == 0
    printed = summary(capsys.readouterr().out)
    rows = list(csv.DictReader((files["tmp"] / "plots" / "frontier.csv").open()))
    assert [float(r["target_bits"]) for r in rows] == [4.0, 6.0, 8.0, 16.0]
    assert rows[-1]["formats"].startswith("none:")
    # 16 bits is the unquantized model: its perplexity is the "before" one.
    before = float(printed["perplexity"].split("before ")[1].split(",")[0])
    assert float(rows[-1]["metric"]) == pytest.approx(before, abs=5e-5)
    assert (files["tmp"] / "plots" / "frontier.png").read_bytes()[:4] == b"\x89PNG"
    assert printed["frontier"].startswith(f"{stem}.csv, {stem}.png (4 bits: ")


@pytest.mark.parametrize("extra, message", [
    (["--qformat", "fp8,nvfp4"], r"names several formats: pass --auto_quantize_bits"),
    (["--qformat", "none", "--auto_quantize_bits", "8"], r"names no quantized format"),
    (SEARCH, r"needs calibration data .*--dataset"),
    (SEARCH + ["--dataset", "CALIB", "--low_memory_mode"], r"drop --low_memory_mode"),
    (SEARCH + ["--dataset", "CALIB", "--auto_quantize_frontier", "6"], r"measures perplexity: pass --eval_text"),
    (SEARCH + ["--dataset", "CALIB", "--auto_quantize_frontier", "six", "--eval_text", "CALIB"],
     r"comma-separated numbers of bits, got 'six'"),
    (SEARCH + ["--dataset", "CALIB", "--export_target", "vllm"], r"per-layer formats \['fp8', 'int4_awq'\]"),
    (["--qformat", "fp8,fp9", "--auto_quantize_bits", "8", "--dataset", "CALIB"], r"unknown qformat 'fp9'"),
    (SEARCH + ["--dataset", "CALIB", "--algorithm", "awq_lite"], r"'awq_lite' does not fit qformat 'fp8'"),
    (SEARCH + ["--dataset", "CALIB", "--auto_quantize_method", "hessian"], r"unknown --auto_quantize_method"),
])
def test_bad_search_arguments_fail_before_any_work(files, capsys, extra, message):
    arguments = [a.replace("CALIB", files["calib"]) for a in extra]
    assert main(["quantize", files["src"], *arguments]) == 1
    assert re.search(message, capsys.readouterr().err)
