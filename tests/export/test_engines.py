"""engines.py: the serving table, its consistency with the exporters, the commands, and the README copy."""

from pathlib import Path

import pytest

from hf_ptq_plugin import FORMATS, KV_FORMATS
from hf_ptq_plugin.export.compressed_tensors import COMPRESSED_TENSORS_QFORMATS
from hf_ptq_plugin.export.engines import (
    COMPRESSED_TENSORS,
    DIALECTS,
    ENGINES,
    KV_CACHE,
    MODELOPT,
    SERVING,
    TRTLLM_LEGACY,
    describe_serving,
    engines_serving,
    engines_serving_formats,
    markdown_table,
    readme_section,
    serve_command,
    update_readme,
)
from hf_ptq_plugin.export.trtllm_legacy import LEGACY_QUANT_ALGO

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_holds_exactly_the_generated_table():
    assert readme_section(README.read_text(encoding="utf-8")) == markdown_table()


def test_update_readme_rewrites_only_the_marked_section(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("intro\n\n"
                      "<!-- engines-table:start (generated: python -m hf_ptq_plugin.export.engines README.md) -->\n"
                      "old table\n<!-- engines-table:end -->\n\noutro\n", encoding="utf-8")
    assert update_readme(readme) is True
    text = readme.read_text(encoding="utf-8")
    assert text.startswith("intro\n\n") and text.endswith("<!-- engines-table:end -->\n\noutro\n")
    assert readme_section(text) == markdown_table()
    assert update_readme(readme) is False  # idempotent


def test_a_readme_without_markers_is_an_error(tmp_path):
    (tmp_path / "README.md").write_text("no table here\n")
    with pytest.raises(ValueError, match="engines-table:start"):
        update_readme(tmp_path / "README.md")


def test_every_table_entry_names_a_real_format_engine_and_dialect():
    assert set(SERVING) == set(ENGINES) == set(KV_CACHE)
    for engine, table in SERVING.items():
        assert set(table) <= set(FORMATS), engine
        assert set(table.values()) <= set(DIALECTS), engine
        assert set(table.values()) <= set(KV_CACHE[engine]), engine  # every dialect used has its KV entry
        for kv in KV_CACHE[engine].values():
            assert set(kv) <= {"none", *KV_FORMATS} and "none" in kv


def test_every_served_combination_has_an_exporter_that_writes_it():
    for engine, table in SERVING.items():
        for qformat, dialect in table.items():
            if dialect == COMPRESSED_TENSORS:
                assert qformat in COMPRESSED_TENSORS_QFORMATS, (engine, qformat)
            if dialect == TRTLLM_LEGACY:
                assert qformat in LEGACY_QUANT_ALGO, (engine, qformat)


def test_engines_serving_follows_the_reference_table():
    assert engines_serving("fp8") == {"trtllm": MODELOPT, "vllm": MODELOPT, "sglang": MODELOPT}
    assert engines_serving("w4a8_awq") == {"trtllm": MODELOPT}  # docs/modelopt-facts.md §7.4: TRT-LLM only
    assert engines_serving("w4a16_nvfp4") == {"vllm": MODELOPT, "sglang": COMPRESSED_TENSORS}
    assert engines_serving("int4_awq") == {"trtllm": MODELOPT, "vllm": COMPRESSED_TENSORS, "sglang": COMPRESSED_TENSORS}
    assert engines_serving("int8_sq")["trtllm"] == TRTLLM_LEGACY


def test_the_kv_cache_format_narrows_the_engines():
    # vLLM's flat config.json branch drops an NVFP4 KV cache (modelopt.py, ModelOptQuantConfigBase.from_config).
    assert engines_serving("nvfp4", "nvfp4") == {"trtllm": MODELOPT}
    assert engines_serving("nvfp4", "fp8") == {"trtllm": MODELOPT, "vllm": MODELOPT, "sglang": MODELOPT}
    assert engines_serving("int8_sq", "fp8") == {"trtllm": TRTLLM_LEGACY, "vllm": COMPRESSED_TENSORS}
    assert engines_serving("int8_sq", "nvfp4") == {}


def test_per_layer_formats_are_served_where_each_is_a_mixed_layer():
    # vLLM's ModelOptMixedPrecisionConfig: FP8 / NVFP4 / W4A16_NVFP4 / MXFP8 layers; SGLang: FP8 / NVFP4.
    assert engines_serving_formats(["fp8", "nvfp4"]) == {"trtllm": MODELOPT, "vllm": MODELOPT, "sglang": MODELOPT}
    assert engines_serving_formats(["fp8", "w4a16_nvfp4"]) == {"vllm": MODELOPT}
    assert engines_serving_formats(["fp8", "int4_awq"]) == {"trtllm": MODELOPT}
    assert engines_serving_formats(["fp8", "nvfp4"], "nvfp4") == {"trtllm": MODELOPT}
    assert engines_serving_formats(["int4_awq"]) == engines_serving("int4_awq")


def test_a_mixed_export_target_must_take_every_format(tmp_path):
    from hf_ptq_plugin.export import formats_dialect

    assert formats_dialect("vllm", ["fp8", "nvfp4"]) == MODELOPT
    assert formats_dialect("modelopt", ["fp8", "int8_sq"]) == MODELOPT
    with pytest.raises(ValueError, match=r"'sglang' cannot serve per-layer formats \['fp8', 'mxfp8'\].*"
                                         r"may be fp8, nvfp4"):
        formats_dialect("sglang", ["fp8", "mxfp8"])
    with pytest.raises(ValueError, match=r"unknown qformat 'fp9'"):
        formats_dialect("vllm", ["fp8", "fp9"])


@pytest.mark.parametrize("bad, message", [
    ({"qformat": "int3"}, "unknown qformat 'int3'; valid: fp8"),
    ({"kv_cache_qformat": "int8"}, "unknown kv_cache_qformat 'int8'; valid: none"),
])
def test_unknown_names_are_errors_listing_the_valid_ones(bad, message):
    args = {"qformat": "fp8", "kv_cache_qformat": "none", **bad}
    with pytest.raises(ValueError, match=message):
        engines_serving(**args)


def test_serve_commands():
    assert serve_command("vllm", "out/") == "vllm serve out/"
    assert serve_command("vllm", "out/", qformat="nvfp4") == "vllm serve out/ --quantization modelopt_fp4"
    assert serve_command("vllm", "out/", qformat="fp8") == "vllm serve out/ --quantization modelopt"
    assert serve_command("vllm", "out/", qformat="int4_awq") == "vllm serve out/"  # compressed-tensors: detected
    assert serve_command("sglang", "out/") == "python -m sglang.launch_server --model-path out/"
    assert serve_command("trtllm", "out/") == "trtllm-serve out/"
    legacy = serve_command("trtllm", "ckpt", qformat="int8_sq")
    assert legacy == ("trtllm-build --checkpoint_dir ckpt --output_dir ckpt-engine && "
                      "trtllm-serve ckpt-engine --backend tensorrt --tokenizer ckpt")
    with pytest.raises(ValueError, match="unknown engine 'tgi'; valid: trtllm, vllm, sglang"):
        serve_command("tgi", "out/")
    with pytest.raises(ValueError, match=r"sglang does not serve qformat 'w4a8_awq'; .*: trtllm \(modelopt\)"):
        serve_command("sglang", "out/", qformat="w4a8_awq")


def test_table_has_a_row_per_format_and_footnotes_for_conditions():
    table = markdown_table()
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    assert [row.split("`")[1] for row in rows] == list(FORMATS)
    assert "| `w4a8_awq` | modelopt | - | - |" in table
    assert "[^1]:" in table and "| KV cache |" in table
    kv_row = next(line for line in table.splitlines() if line.startswith("| KV cache |"))
    vllm_kv = kv_row.split(" | ")[2]
    assert vllm_kv.startswith("modelopt: none/fp8[^") and "nvfp4" not in vllm_kv
    note = vllm_kv.split("[^")[1].split("]")[0]
    assert f"[^{note}]: no NVFP4 KV cache: vLLM reads config.json's quantization_config" in table
    assert "vllm/model_executor/layers/quantization/modelopt.py" in table


def test_describe_serving_can_leave_a_dialect_out():
    assert describe_serving("int4_awq") == "trtllm (modelopt), vllm (compressed-tensors), sglang (compressed-tensors)"
    assert describe_serving("int4_awq", dialects=(MODELOPT, TRTLLM_LEGACY)) == "trtllm (modelopt)"
    assert describe_serving("w4a8_awq", dialects=(COMPRESSED_TENSORS,)) == "no engine"
