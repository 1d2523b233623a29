"""Checkpoints in ModelOpt's own layout, written here by hand from the reference (docs/modelopt-facts.md
§2.7, §6.2-6.4) with no use of the package's numerics or exporter, load through from_pretrained."""

import json
import logging

import pytest
import torch
from conftest import sqnr_db, tiny_llama
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from hf_ptq_plugin import QuantLinear

FP8 = torch.float8_e4m3fn
E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
FP8_GROUPS = {"group_0": {"input_activations": {"dynamic": False, "num_bits": 8, "type": "float"},
                          "weights": {"dynamic": False, "num_bits": 8, "type": "float"}, "targets": ["Linear"]}}


def fp8(w, scale):
    return (w / scale).clamp(-448, 448).to(FP8)


def int4_pack_rows(q):  # rows 2j (low nibble) and 2j+1 (high nibble), two's complement
    u = q.to(torch.int16) & 0xF
    return (u[0::2] | (u[1::2] << 4)).to(torch.uint8)


def e2m1_codes(y):  # nearest grid value, exact ties to the even index, saturating at 6
    distance = (y.abs().clamp(max=6)[..., None] - E2M1).abs()
    nearest = distance == distance.amin(dim=-1, keepdim=True)
    index = (nearest * (1.0 + (torch.arange(8) % 2 == 0))).argmax(dim=-1)
    return (index | ((y < 0).long() << 3)).to(torch.uint8)


def nvfp4(w, amax):
    gs = amax / 2688
    blocks = w.reshape(w.shape[0], -1, 16)
    bs = blocks.abs().amax(-1) / (6 * gs)
    bs8 = torch.where(bs == 0, torch.ones_like(bs), bs).clamp(2**-9, 448).to(FP8)
    codes = e2m1_codes(blocks / (bs8.float() * gs)[..., None]).reshape(w.shape)
    values = (E2M1[(codes & 7).long()] * (1 - 2 * (codes >> 3).float())).reshape(blocks.shape)
    tensors = {"weight": codes[:, 0::2] | (codes[:, 1::2] << 4), "weight_scale": bs8, "weight_scale_2": gs}
    return tensors, (values * bs8.float()[..., None] * gs).reshape(w.shape)


def hand_quantize(algo, w, group_amax):
    """(checkpoint tensors, the weight an engine reconstructs) for one fp32 weight (n, k)."""
    n, k = w.shape
    if algo == "FP8":
        ws = w.abs().max() / 448
        return {"weight": fp8(w, ws), "weight_scale": ws}, fp8(w, ws).float() * ws
    if algo == "FP8_PER_CHANNEL_PER_TOKEN":
        ws = w.abs().amax(1) / 448
        return {"weight": fp8(w, ws[:, None]), "weight_scale": ws}, fp8(w, ws[:, None]).float() * ws[:, None]
    if algo == "fp8_pb_wo":
        tiles = w.reshape(n // 128, 128, k // 128, 128)
        ws = tiles.abs().amax(dim=(1, 3), keepdim=True) / 448
        return {"weight": fp8(tiles, ws).reshape(n, k), "weight_scale": ws}, (fp8(tiles, ws).float() * ws).reshape(n, k)
    if algo in ("W8A16", "W8A8_SQ_PER_CHANNEL"):
        ws = w.abs().amax(1) / 127
        q = torch.round(w / ws[:, None]).clamp(-128, 127)
        return {"weight": q.to(torch.int8), "weight_scale": ws}, q * ws[:, None]
    if algo in ("W4A16_AWQ", "W4A8_AWQ"):
        s = w.reshape(n, k // 128, 128).abs().amax(-1) / 7
        q = torch.round(w / s.repeat_interleave(128, 1)).clamp(-8, 7)
        tensors = {"weight": int4_pack_rows(q), "weight_scale": s}
        if algo == "W4A16_AWQ":
            return tensors, q * s.repeat_interleave(128, 1)
        ws2 = group_amax / 448  # the FP8 second level; the engine feeds fp16(fp16(ws) * (1 / ws2)) group scales
        ratio = (s.half().float() * (1 / ws2)).half().float().repeat_interleave(128, 1)
        return {**tensors, "weight_scale_2": ws2}, (q * ratio).clamp(-448, 448).to(FP8).float() * ws2
    if algo in ("NVFP4", "NVFP4_AWQ", "W4A16_NVFP4"):
        return nvfp4(w, group_amax)
    if algo == "MXFP8":
        e = torch.ceil(torch.log2(w.reshape(n, k // 32, 32).abs().amax(-1) / 448)).clamp(-127, 127)
        step = torch.exp2(e).repeat_interleave(32, 1)
        return {"weight": fp8(w, step), "weight_scale": (e + 127).to(torch.uint8)}, fp8(w, step).float() * step
    raise AssertionError(algo)


ALGOS = ("FP8", "FP8_PER_CHANNEL_PER_TOKEN", "fp8_pb_wo", "W8A16", "W8A8_SQ_PER_CHANNEL", "W4A16_AWQ", "W4A8_AWQ",
         "NVFP4", "NVFP4_AWQ", "W4A16_NVFP4", "MXFP8")
STATIC_INPUT = ("FP8", "W8A8_SQ_PER_CHANNEL", "W4A8_AWQ", "NVFP4", "NVFP4_AWQ")
GROUP_SIZE = {"W4A16_AWQ": 128, "W4A8_AWQ": 128, "NVFP4": 16, "NVFP4_AWQ": 16, "W4A16_NVFP4": 16, "MXFP8": 32}


def pqs_layers(algo):
    """Where ModelOpt leaves pre_quant_scale: SmoothQuant everywhere, AWQ only on o_proj/down_proj."""
    if algo == "W8A8_SQ_PER_CHANNEL":
        return LINEARS
    return ("self_attn.o_proj", "mlp.down_proj") if "AWQ" in algo else ()


def write_checkpoint(directory, algo, kv=None, kv_scales=True, with_pqs=True):
    """A 1-layer bf16 Llama in ModelOpt's unified layout; returns {layer: (engine weight, pqs)}."""
    model = tiny_llama(layers=1, kv_heads=4 if algo == "fp8_pb_wo" else 2).to(torch.bfloat16)
    model.config.save_pretrained(directory)
    state = {k: v for k, v in model.state_dict().items() if not any(f".{leaf}." in k for leaf in LINEARS)}
    expected, torch_gen = {}, torch.Generator().manual_seed(0)
    for group in (LINEARS[:3], LINEARS[3:4], LINEARS[4:6], LINEARS[6:]):  # engines fuse q/k/v and gate/up
        weights = {leaf: model.get_submodule(f"model.layers.0.{leaf}").weight.detach().float() for leaf in group}
        group_amax = torch.stack([w.abs().max() for w in weights.values()]).max()
        input_scale = torch.rand((), generator=torch_gen) / 20 + 0.01
        for leaf, w in weights.items():
            prefix = f"model.layers.0.{leaf}"
            tensors, engine_weight = hand_quantize(algo, w, group_amax)
            if algo in STATIC_INPUT:
                tensors["input_scale"] = input_scale.clone()  # one value per fused group, as engines need
            pqs = None
            if with_pqs and leaf in pqs_layers(algo):
                pqs = (torch.rand(w.shape[1], generator=torch_gen) + 0.5).to(torch.bfloat16)
                tensors["pre_quant_scale"] = pqs
            state.update({f"{prefix}.{name}": t.contiguous() for name, t in tensors.items()})
            expected[prefix] = (engine_weight, pqs, tensors.get("input_scale"))
    if kv and kv_scales:
        state["model.layers.0.self_attn.k_proj.k_scale"] = torch.tensor(0.03)
        state["model.layers.0.self_attn.v_proj.v_scale"] = torch.tensor(0.02)
    save_file(state, directory / "model.safetensors", metadata={"format": "pt"})
    _write_configs(directory, algo, kv)
    return expected


def _write_configs(directory, algo, kv):
    producer = {"name": "modelopt", "version": "0.47.0"}
    config = json.loads((directory / "config.json").read_text())
    quantization = {"ignore": ["lm_head"], "quant_algo": algo, "producer": producer, "quant_method": "modelopt"}
    if algo == "FP8":
        quantization["config_groups"] = FP8_GROUPS
    elif algo in ("NVFP4", "W4A16_NVFP4"):
        fp4 = {"dynamic": False, "num_bits": 4, "type": "float", "group_size": 16}
        quantization["config_groups"] = {"group_0": {"weights": fp4, "targets": ["Linear"],
                                                     **({"input_activations": fp4} if algo == "NVFP4" else {})}}
    if kv:
        quantization["kv_cache_scheme"] = FP8_GROUPS["group_0"]["weights"] if kv == "FP8" else kv
    config["quantization_config"] = quantization
    (directory / "config.json").write_text(json.dumps(config))
    hf_quant = {"quant_algo": algo, "kv_cache_quant_algo": kv, "group_size": GROUP_SIZE.get(algo),
                "exclude_modules": ["lm_head"]}
    (directory / "hf_quant_config.json").write_text(json.dumps({"producer": producer, "quantization": hf_quant}))


@pytest.mark.parametrize("algo", ALGOS)
def test_each_quant_algo_loads_to_the_engines_weights_and_scales(algo, tmp_path, token_ids):
    expected = write_checkpoint(tmp_path, algo)
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert (model.hf_quantizer.pre_quantized
            and model.config.quantization_config.format.quant_algo.upper() == algo.upper())
    dense = tiny_llama(layers=1, kv_heads=4 if algo == "fp8_pb_wo" else 2)
    for prefix, (engine_weight, pqs, input_scale) in expected.items():
        module = model.get_submodule(prefix)
        assert isinstance(module, QuantLinear) and module.input_calibrated
        # Equal up to the order of the fp32 scale products (a misread layout is off by far more).
        torch.testing.assert_close(module.dequantized_weight(), engine_weight, rtol=1e-6, atol=0, msg=prefix)
        assert ((module.pre_quant_scale is None) == (pqs is None)
                and (pqs is None or torch.equal(module.pre_quant_scale, pqs)))
        assert input_scale is None or torch.equal(module.input_scale, input_scale)
        dense.get_submodule(prefix).weight.data = engine_weight * (1 if pqs is None else pqs.float())
    with torch.no_grad():
        found = model(token_ids).logits.float()
        reference = dense.to(torch.bfloat16)(token_ids).logits.float()
    # Weight-only formats differ from the dense bf16 model by rounding only (measured 44-45 dB); the
    # others also by activation quantization (15-31 dB). A misread layout would give about 0 dB.
    weight_only = algo in ("fp8_pb_wo", "W8A16", "W4A16_AWQ", "W4A16_NVFP4")
    assert sqnr_db(reference, found) > (40 if weight_only else 12)


def test_awq_checkpoint_without_pre_quant_scale_loads(tmp_path):
    write_checkpoint(tmp_path, "W4A16_AWQ", with_pqs=False)
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert all(m.pre_quant_scale is None for m in model.modules() if isinstance(m, QuantLinear))


@pytest.mark.parametrize("kv", ["FP8", "NVFP4"])
def test_kv_scales_present_are_used(kv, tmp_path, token_ids):
    write_checkpoint(tmp_path, "NVFP4", kv=kv)
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    attention = model.model.layers[0].self_attn
    assert attention.kv_format.kv_cache_quant_algo == kv and model.config._attn_implementation == "hf_ptq_kv_sdpa"
    assert (torch.equal(attention.k_proj.k_scale, torch.tensor(0.03))
            and torch.equal(attention.v_proj.v_scale, torch.tensor(0.02)))


def test_kv_scales_absent_default_to_one_with_a_single_warning_and_are_not_written_back(tmp_path, caplog):
    write_checkpoint(tmp_path / "src", "FP8", kv="FP8", kv_scales=False)
    with caplog.at_level(logging.WARNING, logger="hf_ptq_plugin"):
        model = AutoModelForCausalLM.from_pretrained(tmp_path / "src")
    assert [r.message.count("no k/v scales") for r in caplog.records] == [1]
    assert torch.equal(model.model.layers[0].self_attn.v_proj.v_scale, torch.tensor(1.0))
    model.save_pretrained(tmp_path / "out")
    with safe_open(tmp_path / "out" / "model.safetensors", framework="pt") as handle:
        assert not any(k.endswith(("k_scale", "v_scale")) for k in handle.keys())
    hf_quant = json.loads((tmp_path / "out" / "hf_quant_config.json").read_text())["quantization"]
    assert hf_quant["kv_cache_quant_algo"] == "FP8"


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.pop("model.layers.0.self_attn.q_proj.weight_scale"),
     r"'model.layers.0.self_attn.q_proj.weight_scale' is missing: NVFP4 expects F8_E4M3 \[128, 8\]; found no such"),
    (lambda s: s.update({"model.layers.0.mlp.up_proj.weight_scale": torch.zeros(256, 4, dtype=FP8)}),
     r"'model.layers.0.mlp.up_proj.weight_scale': NVFP4 expects F8_E4M3 \[256, 8\]; found F8_E4M3 \[256, 4\]"),
    (lambda s: s.update({"model.layers.0.mlp.down_proj.weight_scale_2": torch.tensor(1.0, dtype=torch.bfloat16)}),
     r"'model.layers.0.mlp.down_proj.weight_scale_2': NVFP4 expects F32 \[\]; found BF16 \[\]"),
    (lambda s: s.update({"model.layers.0.self_attn.k_proj.k_scale": torch.ones(2)}),
     r"'model.layers.0.self_attn.k_proj.k_scale': KV cache expects F32 \[\]; found F32 \[2\]"),
])
def test_a_bad_tensor_names_itself_what_was_expected_and_what_was_found(edit, message, tmp_path):
    write_checkpoint(tmp_path, "NVFP4", kv="FP8")
    state = load_file(tmp_path / "model.safetensors")
    edit(state)
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=message):
        AutoModelForCausalLM.from_pretrained(tmp_path)


@pytest.mark.parametrize("algo, message", [("W2A16", r"unknown quant_algo 'W2A16'; valid: FP8, FP8_PER_CHANNEL"),
                                           ("MIXED_PRECISION",
                                            r"MIXED_PRECISION needs a non-empty quantized_layers mapping; found None")])
def test_an_unknown_quant_algo_lists_the_valid_ones(algo, message, tmp_path):
    write_checkpoint(tmp_path, "FP8")
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"]["quant_algo"] = algo
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        AutoModelForCausalLM.from_pretrained(tmp_path)


MIXED = {"self_attn.q_proj": "FP8", "self_attn.k_proj": "FP8", "self_attn.v_proj": "FP8", "self_attn.o_proj": "FP8",
         "mlp.gate_proj": "NVFP4", "mlp.up_proj": "NVFP4", "mlp.down_proj": "W4A16_AWQ"}
MIXED_LAYER_CONFIGS = {"FP8": {"quant_algo": "FP8"}, "NVFP4": {"quant_algo": "NVFP4", "group_size": 16},
                       "W4A16_AWQ": {"quant_algo": "W4A16_AWQ", "group_size": 128, "has_zero_point": False,
                                     "pre_quant_scale": True}}


def write_mixed_checkpoint(directory):
    """A 1-layer Llama in ModelOpt's MIXED_PRECISION layout (§6.2): FP8 attention, NVFP4 gate/up, INT4 down."""
    directory.mkdir()
    model = tiny_llama(layers=1).to(torch.bfloat16)
    model.config.save_pretrained(directory)
    state = {k: v for k, v in model.state_dict().items() if not any(f".{leaf}." in k for leaf in LINEARS)}
    expected, torch_gen = {}, torch.Generator().manual_seed(0)
    for group in (LINEARS[:3], LINEARS[3:4], LINEARS[4:6], LINEARS[6:]):
        algo = MIXED[group[0]]
        weights = {leaf: model.get_submodule(f"model.layers.0.{leaf}").weight.detach().float() for leaf in group}
        group_amax = torch.stack([w.abs().max() for w in weights.values()]).max()
        input_scale = torch.rand((), generator=torch_gen) / 20 + 0.01
        for leaf, w in weights.items():
            tensors, expected[f"model.layers.0.{leaf}"] = hand_quantize(algo, w, group_amax)
            if algo in STATIC_INPUT:
                tensors["input_scale"] = input_scale.clone()
            state.update({f"model.layers.0.{leaf}.{name}": t.contiguous() for name, t in tensors.items()})
    save_file(state, directory / "model.safetensors", metadata={"format": "pt"})
    layers = {f"model.layers.0.{leaf}": MIXED_LAYER_CONFIGS[algo] for leaf, algo in MIXED.items()}
    producer = {"name": "modelopt", "version": "0.47.0"}
    config = json.loads((directory / "config.json").read_text())
    config["quantization_config"] = {"ignore": [], "quant_algo": "MIXED_PRECISION", "producer": producer,
                                     "quant_method": "modelopt", "quantized_layers": layers}
    (directory / "config.json").write_text(json.dumps(config))
    hf_quant = {"quant_algo": "MIXED_PRECISION", "kv_cache_quant_algo": None, "quantized_layers": layers}
    (directory / "hf_quant_config.json").write_text(json.dumps({"producer": producer, "quantization": hf_quant}))
    return expected, layers


def test_mixed_precision_checkpoint_loads_each_layer_in_its_format_and_saves_back(tmp_path, token_ids):
    expected, layers = write_mixed_checkpoint(tmp_path / "src")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "src")
    for prefix, engine_weight in expected.items():
        module = model.get_submodule(prefix)
        assert isinstance(module, QuantLinear) and module.fmt.quant_algo == MIXED[prefix.split(".", 3)[3]], prefix
        torch.testing.assert_close(module.dequantized_weight(), engine_weight, rtol=1e-6, atol=0, msg=prefix)
    assert model.model.layers[0].mlp.down_proj.group_size == 128
    with torch.no_grad():
        logits = model(token_ids).logits
    model.save_pretrained(tmp_path / "out")
    hf_quant = json.loads((tmp_path / "out" / "hf_quant_config.json").read_text())["quantization"]
    assert hf_quant == {"quant_algo": "MIXED_PRECISION", "kv_cache_quant_algo": None, "quantized_layers": layers}
    written = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert written["quant_algo"] == "MIXED_PRECISION" and written["quantized_layers"] == layers
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    with torch.no_grad():
        assert torch.equal(reloaded(token_ids).logits, logits)


def test_mixed_precision_errors_name_the_problem(tmp_path):
    from hf_ptq_plugin import PTQConfig, export_checkpoint, quantize

    _, layers = write_mixed_checkpoint(tmp_path / "src")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "src")
    with pytest.raises(ValueError, match=r"'vllm' cannot serve per-layer formats \['fp8', 'int4_awq', 'nvfp4'\]"):
        export_checkpoint(model, tmp_path / "vllm", target="vllm")
    with pytest.raises(ValueError, match="quantize\\(\\) takes one qformat"):
        quantize(tiny_llama(), PTQConfig(layer_qformats={"model.layers.0.mlp.up_proj": "fp8"}))
    config = json.loads((tmp_path / "src" / "config.json").read_text())
    config["quantization_config"]["quantized_layers"]["model.layers.0.mlp"] = {"quant_algo": "FP8"}
    (tmp_path / "src" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="lists 'model.layers.0.mlp', which is not an nn.Linear"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "src")


MOE_ALGOS = ("FP8", "NVFP4", "NVFP4_AWQ", "W4A16_AWQ", "W4A8_AWQ")


def moe_model():
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    config = Qwen3MoeConfig(hidden_size=128, intermediate_size=256, moe_intermediate_size=128, num_experts=4,
                            num_experts_per_tok=2, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                            head_dim=32, vocab_size=320)
    return Qwen3MoeForCausalLM(config).eval()


def write_moe_checkpoint(directory, algo):
    """A 1-layer bf16 Qwen3-MoE in ModelOpt HEAD's layout (docs/modelopt-facts.md §6.4, "MoE"): per-expert
    `mlp.experts.{e}.{gate,up,down}_proj` tensors, the router `mlp.gate` unquantized and excluded, one
    input_scale per projection input shared by all experts, an expert's gate and up quantized against
    one second-level amax, and AWQ's pre_quant_scale averaged over the experts (so equal across them).
    Returns {module name: (engine weight, pre_quant_scale)}."""
    model = moe_model().to(torch.bfloat16)
    model.config.save_pretrained(directory)
    experts = model.model.layers[0].mlp.experts
    state = {k: v for k, v in model.state_dict().items()
             if ".experts." not in k and not any(f".{leaf}." in k for leaf in LINEARS[:4])}
    expected, gen = {}, torch.Generator().manual_seed(0)

    def random_scale():
        return (torch.rand(128, generator=gen) + 0.5).to(torch.bfloat16)

    def put(prefix, tensors, engine_weight, input_scale, pqs):
        tensors = dict(tensors)
        if algo in STATIC_INPUT:
            tensors["input_scale"] = input_scale.clone()
        if pqs is not None:
            tensors["pre_quant_scale"] = pqs.clone()  # one tensor per expert, equal values
        state.update({f"{prefix}.{name}": t.contiguous() for name, t in tensors.items()})
        expected[prefix] = (engine_weight, pqs)

    for group in (LINEARS[:3], LINEARS[3:4]):
        weights = {leaf: model.get_submodule(f"model.layers.0.{leaf}").weight.detach().float() for leaf in group}
        group_amax, scale = torch.stack([w.abs().max() for w in weights.values()]).max(), torch.tensor(0.02)
        for leaf, w in weights.items():
            pqs = random_scale() if "AWQ" in algo and leaf == LINEARS[3] else None  # o_proj keeps its own
            put(f"model.layers.0.{leaf}", *hand_quantize(algo, w, group_amax), scale, pqs)
    pqs = {kind: random_scale() if "AWQ" in algo else None for kind in ("gate_up", "down")}
    for e in range(4):
        gate, up = experts.gate_up_proj[e].detach().float().chunk(2)
        down = experts.down_proj[e].detach().float()
        pair_amax = torch.maximum(gate.abs().max(), up.abs().max())  # gate and up share weight_scale_2
        for name, w, amax, kind in (("gate_proj", gate, pair_amax, "gate_up"), ("up_proj", up, pair_amax, "gate_up"),
                                    ("down_proj", down, down.abs().max(), "down")):
            scale = torch.tensor(0.03 if kind == "gate_up" else 0.05)
            put(f"model.layers.0.mlp.experts.{e}.{name}", *hand_quantize(algo, w, amax), scale, pqs[kind])
    save_file(state, directory / "model.safetensors", metadata={"format": "pt"})
    _write_configs(directory, algo, None)
    for path in (directory / "hf_quant_config.json", directory / "config.json"):
        config = json.loads(path.read_text())
        section = config["quantization"] if "quantization" in config else config["quantization_config"]
        key = "exclude_modules" if "quantization" in config else "ignore"
        section[key] = ["lm_head", "model.layers.0.mlp.gate"]
        path.write_text(json.dumps(config))
    return expected


@pytest.mark.parametrize("algo", MOE_ALGOS)
def test_a_moe_checkpoint_in_modelopt_layout_loads_every_expert_to_the_engines_weights(algo, tmp_path, token_ids):
    from hf_ptq_plugin.modules.quant_experts import QuantExperts

    expected = write_moe_checkpoint(tmp_path, algo)
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(model.model.layers[0].mlp.experts, QuantExperts)
    assert type(model.model.layers[0].mlp.gate).__name__ == "Qwen3MoeTopKRouter"  # the router stays as it was
    dense = moe_model()
    fused = {"gate_up": dense.model.layers[0].mlp.experts.gate_up_proj.data,
             "down": dense.model.layers[0].mlp.experts.down_proj.data}
    for prefix, (engine_weight, pqs) in expected.items():
        module = model.get_submodule(prefix)
        assert isinstance(module, QuantLinear) and module.input_calibrated
        torch.testing.assert_close(module.dequantized_weight(), engine_weight, rtol=1e-6, atol=0, msg=prefix)
        assert (module.pre_quant_scale is None) == (pqs is None)
        assert pqs is None or torch.equal(module.pre_quant_scale, pqs)
        effective = engine_weight * (1 if pqs is None else pqs.float())
        if ".experts." not in prefix:
            dense.get_submodule(prefix).weight.data = effective
            continue
        e, name = int(prefix.split(".")[-2]), prefix.split(".")[-1]
        if name == "down_proj":
            fused["down"][e] = effective
        else:
            fused["gate_up"][e, (0 if name == "gate_proj" else 128):][:128] = effective
    with torch.no_grad():
        found = model(token_ids).logits.float()
        reference = dense.to(torch.bfloat16)(token_ids).logits.float()
    # As for the dense checkpoints: rounding only for weight-only formats, activation quantization too
    # for the others; a misread layout (or expert order) would give about 0 dB.
    assert sqnr_db(reference, found) > (35 if algo == "W4A16_AWQ" else 12)
