"""Which Linears are quantized: ModelOpt's default exclusions, user patterns, fused sibling groups."""

import pytest

from hf_ptq_plugin.calibration.selection import DEFAULT_EXCLUDE_PATTERNS, fused_groups, is_excluded


@pytest.mark.parametrize("name", ["lm_head", "model.layers.3.mlp.gate", "model.layers.0.block_sparse_moe.gate",
                                  "model.layers.1.mlp.router", "model.layers.2.mlp.shared_expert_gate",
                                  "model.vision_tower.encoder.layers.0.fc1", "model.visual.blocks.0.qkv",
                                  "model.multi_modal_projector.linear_1", "mtp.layers.0.proj"])
def test_default_exclusions_cover_heads_routers_and_vision(name):
    assert is_excluded(name, DEFAULT_EXCLUDE_PATTERNS)


@pytest.mark.parametrize("name", ["model.layers.3.mlp.gate_proj", "model.layers.0.self_attn.o_proj",
                                  "model.layers.0.mlp.experts.7.down_proj", "model.layers.1.mlp.up_proj"])
def test_default_exclusions_leave_ordinary_layers_alone(name):
    assert not is_excluded(name, DEFAULT_EXCLUDE_PATTERNS)


def test_a_plain_name_excludes_the_module_and_everything_under_it():
    assert is_excluded("model.layers.1.self_attn.q_proj", ["model.layers.1"])
    assert not is_excluded("model.layers.10.self_attn.q_proj", ["model.layers.1"])


def test_fused_groups_are_qkv_gate_up_and_w1_w3_siblings():
    names = ["a.self_attn.q_proj", "a.self_attn.k_proj", "a.self_attn.v_proj", "a.self_attn.o_proj",
             "a.mlp.gate_proj", "a.mlp.up_proj", "a.mlp.down_proj", "e.experts.0.w1", "e.experts.0.w3",
             "e.experts.0.w2", "b.self_attn.q_proj"]
    assert sorted(map(tuple, fused_groups(names))) == [
        ("a.mlp.gate_proj", "a.mlp.up_proj"), ("a.self_attn.q_proj", "a.self_attn.k_proj", "a.self_attn.v_proj"),
        ("e.experts.0.w1", "e.experts.0.w3")]
