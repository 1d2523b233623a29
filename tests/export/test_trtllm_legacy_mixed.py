"""Per-layer formats (AutoQuantize) as TensorRT-LLM's MIXED_PRECISION legacy checkpoint: quant_cfg.json lists
exactly the quantized legacy Linears, each Linear holds the tensors of its own format (split and padded per
layer), a single-format model is written as before, and what trtllm-build cannot take is refused unwritten.

Expectations come from TensorRT-LLM's loader (models/modeling_utils.py: `LayerQuantConfig` gives a module the
first `quantized_layers` entry whose key fnmatches its name, none meaning unquantized; `trtllm_loader_spec.linear`
for each Linear's layer class), from `linear_tensors` / `merge_qkv` per module (what the single-format writer
writes for that format), and from the §8 shard reassembly of `test_export_trtllm_legacy.py`.
"""

import copy
import dataclasses
import fnmatch
import json

import pytest
import torch
from autoquant.autoquant_data import calibration_loop  # tests/autoquant's data (tests/ is on pythonpath)
from conftest import tiny_llama
from safetensors.torch import load_file
from test_export_trtllm_legacy import reassemble, same
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM
from trtllm_loader_spec import F32, MODEL_DTYPES, linear

from hf_ptq_plugin import PTQConfig, QuantLinear, apply_choice, auto_quantize, export_checkpoint, quantize
from hf_ptq_plugin import formats as F
from hf_ptq_plugin.export.trtllm_layers import linear_tensors, merge_qkv

# HF leaf -> the legacy TensorRT-LLM Linear it is written into.
LEGACY = {"self_attn.q_proj": "attention.qkv", "self_attn.k_proj": "attention.qkv", "self_attn.v_proj": "attention.qkv",
          "self_attn.o_proj": "attention.dense", "mlp.gate_proj": "mlp.fc", "mlp.up_proj": "mlp.gate",
          "mlp.down_proj": "mlp.proj"}
# TensorRT-LLM QuantConfig fields per qformat (group_size added for INT4).
ENTRIES = {"fp8": {"quant_algo": "FP8", "has_zero_point": False, "pre_quant_scale": False},
           "int4_awq": {"quant_algo": "W4A16_AWQ", "has_zero_point": False, "pre_quant_scale": True}}
QKV, O_PROJ = "self_attn.{q_proj,k_proj,v_proj}", "self_attn.o_proj"
GATE_UP, DOWN = "mlp.{gate_proj,up_proj}", "mlp.down_proj"
# Both formats in each layer, INT4 q/k/v (group scales merged), and two groups left unquantized.
TINY_CHOICE = {f"0.{QKV}": "fp8", f"0.{O_PROJ}": "fp8", f"0.{GATE_UP}": "int4_awq", f"0.{DOWN}": "int4_awq",
               f"1.{QKV}": "int4_awq", f"1.{O_PROJ}": "none", f"1.{GATE_UP}": "fp8", f"1.{DOWN}": "none"}
# The same in both layers (one quant_cfg.json serves both pipeline stages); INT4 where the 384-wide model pads.
PADDED_CHOICE = {QKV: "fp8", O_PROJ: "int4_awq", GATE_UP: "int4_awq", DOWN: "fp8"}


def chosen(model, qformats, choice_of, **kwargs):
    """`model` quantized to the choice `choice_of(group name)` of an AutoQuantize search of a copy of it."""
    _, result = auto_quantize(copy.deepcopy(model), qformats, 6.0, calibration_loop(), **kwargs)
    result = dataclasses.replace(result, choice={g.name: choice_of(g.name) for g in result.groups})
    return apply_choice(model, result, calibration_loop()), result


@pytest.fixture(scope="module")
def tiny():
    """(model, result): tiny_llama in TINY_CHOICE; INT4 group 64, so no layer of the 128-wide model pads at tp=2."""
    return chosen(tiny_llama(), ["fp8", "int4_awq"], lambda g: TINY_CHOICE[g.removeprefix("model.layers.")],
                  group_size=64)


@pytest.fixture(scope="module")
def padded():
    """A bfloat16 Llama (hidden 384, intermediate 640, head_dim 64) in PADDED_CHOICE, FP8 KV cache; at tp=2 its
    INT4 layers (group 128) pad their features to multiples of 256, its FP8 ones do not."""
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=384, intermediate_size=640, num_hidden_layers=2, num_attention_heads=4,
                         head_dim=64, num_key_value_heads=2, vocab_size=320, max_position_embeddings=256,
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    return chosen(model, ["fp8", "int4_awq"], lambda g: PADDED_CHOICE[g.split(".", 3)[3]], kv_cache_qformat="fp8")[0]


def legacy_name(hf_name: str) -> str:
    _, _, index, leaf = hf_name.split(".", 3)  # model.layers.{i}.{leaf}
    return f"transformer.layers.{index}.{LEGACY[leaf]}"


def own_tensors(module: nn.Module) -> dict:
    """What the single-format writer writes for `module` in its own format; an nn.Linear's plain weight."""
    return linear_tensors(module, module.fmt) if isinstance(module, QuantLinear) else {"weight": module.weight}


def expected_tensors(model) -> dict:
    """Every legacy tensor, unsharded, each Linear in its own format (q/k/v merged as merge_qkv does)."""
    def named(prefix, tensors):
        return {f"{prefix}.{key}": value for key, value in tensors.items()}

    out = {"transformer.vocab_embedding.weight": model.model.embed_tokens.weight,
           "transformer.ln_f.weight": model.model.norm.weight, **named("lm_head", own_tensors(model.lm_head))}
    for i, layer in enumerate(model.model.layers):
        prefix, attention = f"transformer.layers.{i}", layer.self_attn
        qkv = (attention.q_proj, attention.k_proj, attention.v_proj)
        out.update(named(f"{prefix}.attention.qkv", merge_qkv([own_tensors(m) for m in qkv], getattr(qkv[0], "fmt",
                                                                                                      None))))
        for leaf in ("self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
            out.update(named(f"{prefix}.{LEGACY[leaf]}", own_tensors(layer.get_submodule(leaf))))
        out[f"{prefix}.input_layernorm.weight"] = layer.input_layernorm.weight
        out[f"{prefix}.post_layernorm.weight"] = layer.post_attention_layernorm.weight
    return {name: value.detach() for name, value in out.items()}


def check_reassembles(model, directory, tp: int) -> None:
    """Every rank holds exactly the expected tensors' pieces, which reassemble (§8) to them bit for bit."""
    ranks = [load_file(directory / f"rank{r}.safetensors") for r in range(tp)]
    expected = expected_tensors(model)
    for rank in ranks:
        assert set(rank) == set(expected)
    for name, value in expected.items():
        assert same(reassemble(name, value, [r[name] for r in ranks], tp), value), name


def test_quant_cfg_lists_exactly_the_quantized_legacy_linears(tiny, tmp_path):
    model, result = tiny
    export_checkpoint(model, tmp_path, target="trtllm-legacy")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "config.json", "quant_cfg.json",
                                                          "rank0.safetensors"]
    # ModelOpt's export keeps only these two in config.json; the per-layer fields live in quant_cfg.json.
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["quantization"] == {"quant_algo": "MIXED_PRECISION", "kv_cache_quant_algo": None}
    expected = {legacy_name(name): {**ENTRIES[q], **({"group_size": 64} if q == "int4_awq" else {})}
                for name, q in result.layer_qformats.items()}
    written = json.loads((tmp_path / "quant_cfg.json").read_text())
    assert written == {"quant_algo": "MIXED_PRECISION", "kv_cache_quant_algo": None, "quantized_layers": expected}
    unquantized = {legacy_name(m) for g in result.groups if result.choice[g.name] == "none" for m in g.members}
    assert unquantized == {"transformer.layers.1.attention.dense", "transformer.layers.1.mlp.proj"}
    assert not unquantized & set(written["quantized_layers"])  # unlisted = built unquantized


def test_tensorrt_llms_lookup_gives_each_linear_its_own_format(tiny, tmp_path):
    # LayerQuantConfig._get_quant_cfg: the first key that fnmatches the module name, else no quantization.
    model, _ = tiny
    export_checkpoint(model, tmp_path, target="trtllm-legacy")
    layers = json.loads((tmp_path / "quant_cfg.json").read_text())["quantized_layers"]
    rank = load_file(tmp_path / "rank0.safetensors")
    linears = {name.rsplit(".", 1)[0] for name in rank if name.endswith(".weight") and "norm" not in name
               and "embedding" not in name and "ln_f" not in name}
    assert len(linears) == 2 * 5 + 1
    hf = {legacy_name(n): m for n, m in model.named_modules() if n.split(".", 3)[-1] in LEGACY}
    hf["lm_head"] = model.lm_head
    for name in linears:
        found = next((entry for key, entry in layers.items() if fnmatch.fnmatch(name, key)), None)
        fmt = getattr(hf[name], "fmt", None)
        assert (found and found["quant_algo"]) == (fmt and fmt.quant_algo), name
        dtype = rank[f"{name}.weight"].dtype
        assert dtype == {None: torch.float32, "fp8": torch.float8_e4m3fn, "int4_awq": torch.int8}[fmt and fmt.name]


@pytest.mark.parametrize("tp", [1, 2])
def test_each_linear_holds_the_tensors_of_its_own_format(tiny, tp, tmp_path):
    model, _ = tiny
    export_checkpoint(model, tmp_path, target="trtllm-legacy", tp_size=tp)
    check_reassembles(model, tmp_path, tp)
    # The unquantized o_proj of layer 1 is a plain Linear: its weight alone, as the model holds it.
    rank = load_file(tmp_path / "rank0.safetensors")
    assert [k for k in rank if k.startswith("transformer.layers.1.attention.dense.")] == [
        "transformer.layers.1.attention.dense.weight"]
    o_proj = model.model.layers[1].self_attn.o_proj.weight
    assert torch.equal(rank["transformer.layers.1.attention.dense.weight"], o_proj.chunk(tp, dim=1)[0])


def required(config: dict, layers: dict, rank: int) -> dict:
    """{name: (dtypes, shape)} trtllm-build requires of one rank of a MIXED_PRECISION Llama checkpoint: each
    Linear as the layer class of its quant_cfg.json entry declares it (`linear`), an unlisted one plain."""
    heads, kv_heads, head = config["num_attention_heads"], config["num_key_value_heads"], config["head_size"]
    hidden, inter, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    dtype, tp, pp = MODEL_DTYPES[config["dtype"]], config["mapping"]["tp_size"], config["mapping"]["pp_size"]
    features = {"attention.qkv": ((heads + 2 * kv_heads) * head, hidden, False),
                "attention.dense": (hidden, heads * head, True), "mlp.fc": (inter, hidden, False),
                "mlp.gate": (inter, hidden, False), "mlp.proj": (hidden, inter, True)}

    def spec(name, n, k, row):
        entry = layers.get(name, {})
        return {f"{name}.{key}": value for key, value in
                linear(entry.get("quant_algo"), n, k, dtype, tp, row, entry.get("group_size")).items()}

    out, pp_rank = {}, rank // tp
    for i in range(config["num_hidden_layers"] // pp):  # stage-local indices, as in the rank files
        for module, (n, k, row) in features.items():
            out.update(spec(f"transformer.layers.{i}.{module}", n, k, row))
        out[f"transformer.layers.{i}.input_layernorm.weight"] = ({dtype}, (hidden,))
        out[f"transformer.layers.{i}.post_layernorm.weight"] = ({dtype}, (hidden,))
        if config["quantization"]["kv_cache_quant_algo"]:
            out[f"transformer.layers.{i}.attention.kv_cache_scaling_factor"] = ({F32}, (1,))
    if pp_rank == 0:
        out["transformer.vocab_embedding.weight"] = ({dtype}, (vocab // tp, hidden))
    if pp_rank == pp - 1:
        out["transformer.ln_f.weight"] = ({dtype}, (hidden,))
        out.update(spec("lm_head", vocab, hidden, False))
    return out


@pytest.mark.parametrize("tp, pp", [(1, 1), (2, 1), (1, 2), (2, 2)])
def test_every_rank_holds_what_trtllm_build_requires_per_layer(padded, tp, pp, tmp_path):
    export_checkpoint(padded, tmp_path, target="trtllm-legacy", tp_size=tp, pp_size=pp)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["quantization"] == {"quant_algo": "MIXED_PRECISION", "kv_cache_quant_algo": "FP8"}
    quant_cfg = json.loads((tmp_path / "quant_cfg.json").read_text())
    assert quant_cfg["kv_cache_quant_algo"] == "FP8"
    layers = quant_cfg["quantized_layers"]
    local = [f"transformer.layers.{i}.{m}" for i in range(2 // pp) for m in
             ("attention.qkv", "attention.dense", "mlp.fc", "mlp.gate", "mlp.proj")]
    assert list(layers) == local  # lm_head stays unquantized; names carry stage-local indices
    for rank in range(tp * pp):
        tensors = load_file(tmp_path / f"rank{rank}.safetensors")
        needed = required(config, layers, rank)
        assert set(tensors) == set(needed), rank
        for name, (dtypes, shape) in needed.items():
            assert tensors[name].dtype in dtypes and tuple(tensors[name].shape) == shape, (rank, name)
    if tp == 2:  # padding is per layer: INT4 mlp.fc 640 x 384 pads to 768 x 512, FP8 mlp.proj 384 x 640 does not
        rank0 = load_file(tmp_path / "rank0.safetensors")
        assert rank0["transformer.layers.0.mlp.fc.weight"].shape == (768 // 2 // 2, 512)
        assert rank0["transformer.layers.0.mlp.proj.weight"].shape == (384, 640 // 2)


def test_pipeline_stages_in_different_formats_are_refused(tiny, tmp_path):
    # TensorRT-LLM numbers a stage's layers from 0 and one quant_cfg.json serves every stage.
    message = (r"pp_size=2: one quant_cfg.json serves every pipeline stage .* transformer.layers.0.attention.qkv "
               r"\(FP8\) and transformer.layers.1.attention.qkv \(W4A16_AWQ\) would both be "
               r"transformer.layers.0.attention.qkv. Use pp_size=1")
    with pytest.raises(ValueError, match=message):
        export_checkpoint(tiny[0], tmp_path / "out", target="trtllm-legacy", pp_size=2)
    assert not (tmp_path / "out").exists()


def test_qkv_in_different_formats_is_refused_naming_the_layer(tiny, tmp_path):
    model = copy.deepcopy(tiny[0])
    k_proj = model.model.layers[0].self_attn.k_proj
    model.model.layers[0].self_attn.k_proj = nn.Linear(k_proj.in_features, k_proj.out_features, bias=False)
    with pytest.raises(ValueError, match=r"transformer.layers.0.attention.qkv: q_proj, k_proj, v_proj are "
                                         r"\['fp8', 'unquantized', 'fp8'\]; TensorRT-LLM runs them as one GEMM"):
        export_checkpoint(model, tmp_path / "out", target="trtllm-legacy")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("qformat, group_size, message", [
    ("fp8_pc_pt", None, r"qformat 'fp8_pc_pt' cannot be one layer's format in a MIXED_PRECISION legacy TensorRT-LLM "
                        r"checkpoint: .* valid per layer: fp8, int8_sq, int4_awq, w4a8_awq, nvfp4"),
    ("int8_wo", None, r"qformat 'int8_wo' has no legacy TensorRT-LLM checkpoint: trtllm-build re-quantizes"),
    ("w4a8_awq", 64, r"TensorRT-LLM builds W4A8_AWQ with group_size 128 only, not 64"),  # check_buildable per format
])
def test_a_layer_format_trtllm_build_cannot_take_is_refused(tiny, qformat, group_size, message, tmp_path):
    model = copy.deepcopy(tiny[0])
    attention = model.model.layers[1].self_attn  # its o_proj is unquantized in TINY_CHOICE
    layer = QuantLinear.from_linear(attention.o_proj, F.get_format(qformat), group_size)
    if not layer.input_calibrated:
        layer.set_input_amax(torch.tensor(4.0))
    attention.o_proj = layer
    with pytest.raises(ValueError, match=message):
        export_checkpoint(model, tmp_path / "out", target="trtllm-legacy")
    assert not (tmp_path / "out").exists()


def test_one_format_writes_the_single_format_checkpoint_as_before(token_ids, tmp_path):
    model = quantize(tiny_llama(), PTQConfig(qformat="int4_awq", algorithm="max", group_size=64),
                     forward_loop=lambda m: m(token_ids))
    export_checkpoint(model, tmp_path, target="trtllm-legacy", tp_size=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "config.json", "rank0.safetensors",
                                                          "rank1.safetensors"]  # no quant_cfg.json
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["quantization"] == {"quant_algo": "W4A16_AWQ", "kv_cache_quant_algo": None, "group_size": 64,
                                      "has_zero_point": False, "pre_quant_scale": True, "exclude_modules": ["lm_head"]}
    check_reassembles(model, tmp_path, 2)


def test_one_format_still_needs_every_decoder_linear_quantized(token_ids, tmp_path):
    # A single-format config.json names no layers, so it cannot leave one in full precision.
    model = quantize(tiny_llama(), PTQConfig(qformat="fp8"), forward_loop=lambda m: m(token_ids))
    down_proj = model.model.layers[0].mlp.down_proj
    model.model.layers[0].mlp.down_proj = nn.Linear(down_proj.in_features, down_proj.out_features, bias=False)
    with pytest.raises(ValueError, match=r"the legacy export needs every decoder Linear quantized; unquantized: "
                                         r"\['model.layers.0.mlp.down_proj'\]"):
        export_checkpoint(model, tmp_path / "out", target="trtllm-legacy")
    assert not (tmp_path / "out").exists()
