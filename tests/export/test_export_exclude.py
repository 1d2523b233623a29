"""exclude_modules summarized as prefix wildcards that never catch a quantized layer."""

import fnmatch

from hf_ptq_plugin.export.exclude import summarize_exclude_modules

LAYERS = [f"model.layers.{i}.{leaf}" for i in range(3)
          for leaf in ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]


def covers(patterns, name):
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def test_top_level_and_per_layer_router_names_stay_exact():
    unquantized = ["lm_head", "model.layers.0.mlp.gate", "model.layers.2.mlp.gate"]
    assert summarize_exclude_modules(unquantized, LAYERS) == ["lm_head", "model.layers.0.mlp.gate",
                                                              "model.layers.2.mlp.gate"]


def test_a_whole_subtree_becomes_one_wildcard():
    tower = [f"model.visual.blocks.{i}.attn.qkv" for i in range(4)] + ["model.visual.merger.proj"]
    assert summarize_exclude_modules(tower + ["lm_head"], LAYERS) == ["lm_head", "model.visual*"]


def test_a_fully_excluded_layer_is_caught_by_its_prefix():
    unquantized = [f"model.layers.3.{leaf}" for leaf in ("self_attn.q_proj", "mlp.up_proj")]
    assert summarize_exclude_modules(unquantized, LAYERS) == ["model.layers.3*"]


def test_a_sibling_sharing_the_prefix_forces_the_dotted_form():
    # "model.layers.1.mlp*" would catch the quantized "model.layers.1.mlp_shared.proj".
    quantized = ["model.layers.1.mlp_shared.proj"]
    unquantized = ["model.layers.1.mlp.a", "model.layers.1.mlp.b"]
    assert summarize_exclude_modules(unquantized, quantized) == ["model.layers.1.mlp.*"]


def test_patterns_cover_every_unquantized_name_and_no_quantized_one():
    unquantized = ["lm_head", "model.layers.1.mlp.down_proj", "model.layers.1.self_attn.o_proj", "model.mtp.0.proj",
                   "model.layers.10.mlp.up_proj"]
    quantized = [n for n in LAYERS if n not in unquantized] + ["model.layers.1.mlp.up_proj"]
    patterns = summarize_exclude_modules(unquantized, quantized)
    assert all(covers(patterns, n) for n in unquantized)
    assert not any(covers(patterns, n) for n in quantized)
    assert patterns == sorted(set(patterns))
