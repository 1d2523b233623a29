"""benchmarks/scale.py on a tiny model of Llama-3-8B's family: its table, the layer-0 check of the exports, the
checkpoint it writes shard by shard, and the watchdog that enforces the memory limit."""

import json
import random
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import scale
from conftest import WORDS, word_tokenizer
from safetensors import safe_open
from scale import HEADER, run_watched
from synthetic_llama3 import llama3_shape, make_checkpoint

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "scale.py"
TINY = ["--layers", "2", "--hidden", "256", "--vocab", "512", "--calib-samples", "4", "--calib-seq-len", "64",
        "--check-layers", "2", "--check-hidden", "256", "--markdown"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A work dir, a word-level tokenizer folder and a calibration text: no downloads."""
    root = tmp_path_factory.mktemp("scale")
    word_tokenizer().save_pretrained(root / "tokenizer")
    random.seed(0)
    (root / "calib.txt").write_text(" ".join(random.choice(WORDS) for _ in range(5000)))
    return root


def run_script(inputs, *extra):
    args = [sys.executable, str(SCRIPT), "--work-dir", str(inputs / "work"), "--tokenizer", str(inputs / "tokenizer"),
            "--calib-file", str(inputs / "calib.txt"), *TINY, *extra]
    return subprocess.run(args, capture_output=True, text=True, timeout=300)


def table(stdout: str) -> dict:
    """{algorithm: {column: cell}} from the Markdown table."""
    lines = [line for line in stdout.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in lines[1:]]
    return header, {row[0]: dict(zip(header, row)) for row in rows}


def test_a_tiny_run_prints_the_table_and_its_exports_reload_to_the_same_layer_0_outputs(inputs):
    done = run_script(inputs, "--algorithms", "awq")
    assert done.returncode == 0, done.stderr[-3000:]
    header, rows = table(done.stdout)
    assert header == HEADER
    row = rows["awq_lite"]
    assert row["killed?"] == "no"
    read, calibration, search, vllm, trtllm, total = (float(row[c]) for c in HEADER[1:7])
    assert min(read, calibration, search, vllm, trtllm) >= 0 and total == pytest.approx(
        read + calibration + search + vllm + trtllm, abs=0.3)  # the split covers the whole load
    assert 0.05 < float(row["peak RSS anon GiB"]) < 6
    check = [line for line in done.stdout.splitlines() if line.startswith("layer-0 check awq_lite")]
    assert len(check) == 1 and "PASS" in check[0], done.stdout
    assert "reloaded by PTQHfQuantizer in bf16: equal" in check[0]
    assert "reloaded by CompressedTensorsHfQuantizer in fp32: equal" in check[0]


def test_the_checkpoint_is_written_shard_by_shard_with_the_family_shape_and_outliers(inputs, tmp_path):
    shape = llama3_shape(layers=2, hidden=256, vocab=512)
    assert (shape["num_attention_heads"], shape["num_key_value_heads"], shape["intermediate_size"]) == (8, 2, 896)
    full = llama3_shape(layers=32, hidden=4096)
    assert (full["num_attention_heads"], full["num_key_value_heads"], full["head_dim"],
            full["intermediate_size"], full["vocab_size"]) == (32, 8, 128, 14336, 128256)
    path = make_checkpoint(tmp_path, shape, inputs / "tokenizer", seed=0)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 4  # embeddings, one shard per layer, norm + lm_head
    config = json.loads((path / "config.json").read_text())
    assert config["rope_parameters"]["rope_theta"] == 500000.0 and config["tie_word_embeddings"] is False
    shard = path / index["weight_map"]["model.layers.1.input_layernorm.weight"]
    with safe_open(shard, framework="pt") as f:
        norm = f.get_tensor("model.layers.1.input_layernorm.weight")
        assert (norm == 20).sum() == 8 and (norm == 1).sum() == 256 - 8  # the outlier channels
        assert f.get_tensor("model.layers.1.mlp.down_proj.weight").shape == (256, 896)
    written = (path / "config.json").stat().st_mtime_ns
    assert make_checkpoint(tmp_path, shape, inputs / "tokenizer", seed=0) == path  # reused, not rewritten
    assert (path / "config.json").stat().st_mtime_ns == written


def test_a_case_whose_exports_would_not_fit_on_disk_is_refused_before_it_calibrates(inputs, tmp_path, monkeypatch):
    shape = llama3_shape(layers=2, hidden=256, vocab=512)
    path = make_checkpoint(tmp_path, shape, inputs / "tokenizer", seed=0)
    exports = tmp_path / "exports"
    scale.require_disk_space(path, exports, exports_at_once=2)  # a tiny model's exports fit
    linears = 2 * (256 * (256 + 2 * 64 + 256) + 3 * 256 * 896)  # q, k, v, o and gate, up, down per layer
    others = 2 * 512 * 256 + 2 * 2 * 256 + 256  # embeddings and head, the layers' two norms, the final norm
    expected = linears * scale.INT4_EXPORT_BYTES + 2 * others
    monkeypatch.setattr(scale.shutil, "disk_usage", lambda folder: SimpleNamespace(free=int(3 * expected) - 1))
    with pytest.raises(SystemExit, match=r"3 export\(s\) of .* need about .* GB; .* GB are free"):
        scale.require_disk_space(path, exports, exports_at_once=3)
    scale.require_disk_space(path, exports, exports_at_once=2)


def test_the_watchdog_kills_a_child_above_the_limit_and_spares_one_below():
    hog = [sys.executable, "-c", "import time; b = b'x' * (400 * 2**20); time.sleep(60)"]
    start = time.perf_counter()
    killed = run_watched(hog, limit_bytes=200 * 2**20)
    assert killed["killed"] and killed["returncode"] != 0 and killed["peak"] > 200 * 2**20
    assert time.perf_counter() - start < 30  # killed, not waited for
    # It holds its 50 MiB for a while: a child that exits at once can end between two 10 ms samples.
    small = run_watched([sys.executable, "-c", "import time; b = b'x' * (50 * 2**20); time.sleep(0.5)"],
                        limit_bytes=2**30)
    assert not small["killed"] and small["returncode"] == 0 and 50 * 2**20 < small["peak"] < 2**30


def test_the_script_reports_a_case_killed_at_the_limit(inputs):
    done = run_script(inputs, "--algorithms", "gptq", "--limit-gb", "0.05", "--no-check")
    assert done.returncode == 0, done.stderr[-3000:]  # a kill is a result, not an error
    row = table(done.stdout)[1]["gptq"]
    assert row["killed?"] == "yes" and row["total s"] == "-"
    assert float(row["peak RSS anon GiB"]) >= 0.05
