"""Which serving engine loads which format, in which checkpoint dialect: one table, read everywhere.

`SERVING[engine][qformat]` is the dialect an engine serves a qformat in; a missing entry means we
have no evidence that the engine serves it. `KV_CACHE[engine][dialect]` lists the KV-cache
formats the engine reads in that dialect. Every statement of which engine serves what (export
targets, model cards, CLI messages, the README table that `python -m hf_ptq_plugin.export.engines
README.md` rewrites) derives from these two tables, so none can disagree. Imports only `formats`
(and the README marker helpers).

Dialects: "modelopt" is the unified checkpoint (`docs/modelopt-facts.md` §6), "compressed-tensors"
the layout of the compressed-tensors package (`export/compressed_tensors.py`), "trtllm-legacy"
the TensorRT-LLM checkpoint that `trtllm-build` turns into an engine (§8). Sources are named next
to each entry; "§" means `docs/modelopt-facts.md`.
"""

from typing import Dict, Optional, Tuple

from ..formats import FORMATS, get_format, get_kv_format
from .readme_sections import marked_section, replace_marked_section

ENGINES = ("trtllm", "vllm", "sglang")
MODELOPT, COMPRESSED_TENSORS, TRTLLM_LEGACY = "modelopt", "compressed-tensors", "trtllm-legacy"
DIALECTS = (MODELOPT, COMPRESSED_TENSORS, TRTLLM_LEGACY)

SERVING = {
    # TensorRT-LLM's PyTorch backend reads the unified checkpoint (§7.3, §7.4).
    "trtllm": {
        "fp8": MODELOPT, "fp8_pc_pt": MODELOPT, "int4_awq": MODELOPT, "w4a8_awq": MODELOPT, "nvfp4": MODELOPT,
        "fp8_pb_wo": MODELOPT,  # read as QuantAlgo.FP8_BLOCK_SCALES (§7.3)
        "nvfp4_awq": MODELOPT,  # recent releases only (QuantAlgo.NVFP4_AWQ, §7.3, §7.4)
        "mxfp8": MODELOPT,  # recent releases only (QuantAlgo.MXFP8, §7.4)
        # §7.4: "W8A8_SQ_PER_CHANNEL: via legacy TRT-LLM ckpt"; ModelOpt's hf_ptq.py still exports int8
        # SmoothQuant that way (§8). TensorRT-LLM tensorrt_llm/quantization/quantize.py builds it with
        # Int8SmoothQuantLinear (W8A8_SQ_PER_CHANNEL is not in mode.py's W8A8_SQ_PLUGIN_LIST), whose
        # parameters carry ModelOpt's names (quantization/layers.py).
        "int8_sq": TRTLLM_LEGACY,
        # TensorRT-LLM tensorrt_llm/_torch/modules/linear.py: W8A16 (weight-only, per channel) takes
        # WeightOnlyQuantLinearMethod, which loads `weight` int8 [N, K] + `weight_scale` [N] and lays the
        # weight out for its GEMM at load time. trtllm-build cannot take pre-quantized W8A16 weights
        # (export/trtllm_legacy.py says why), so the unified checkpoint is the only exact route.
        "int8_wo": MODELOPT,
    },
    # vLLM's ModelOpt loader accepts FP8, FP8_PER_CHANNEL_PER_TOKEN, FP8_PB_WO, NVFP4, W4A16_NVFP4, MXFP8
    # and rejects the rest (§7.1; vllm docs/features/quantization/modelopt.md).
    "vllm": {
        "fp8": MODELOPT, "fp8_pc_pt": MODELOPT, "fp8_pb_wo": MODELOPT, "nvfp4": MODELOPT, "w4a16_nvfp4": MODELOPT,
        "mxfp8": MODELOPT,
        # vllm-project/vllm model_executor/layers/quantization/compressed_tensors/compressed_tensors.py
        # (_get_scheme_from_parts) and schemes/compressed_tensors_wNa16.py: pack-quantized symmetric INT
        # weights of 4 or 8 bits, group or channel strategy, no activation quantization -> WNA16 (Marlin).
        "int4_awq": COMPRESSED_TENSORS, "int8_wo": COMPRESSED_TENSORS,
        # Same file: 8-bit INT weights (channel) + static per-tensor INT8 input -> W8A8Int8 with
        # is_static_input_scheme=True (schemes/compressed_tensors_w8a8_int8.py loads `input_scale` (1,)).
        "int8_sq": COMPRESSED_TENSORS,
        # NVFP4 weights + NVFP4 activations (tensor_group, group 16) -> W4A4Fp4; served when no
        # pre_quant_scale is left (the dialect has no per-channel activation scale; export checks).
        "nvfp4_awq": COMPRESSED_TENSORS,
    },
    # SGLang's ModelOpt loader: FP8 and NVFP4 only (§7.2, §7.4).
    "sglang": {
        "fp8": MODELOPT, "nvfp4": MODELOPT,
        # sgl-project/sglang python/sglang/srt/layers/quantization/compressed_tensors/: schemes/
        # compressed_tensors_wNa16.py (4 and 8 bits, Marlin), compressed_tensors_w8a8_int8.py (loads the
        # static input_scale but quantizes activations per token at run time), compressed_tensors_w8a8_fp8.py
        # (channel weights + dynamic per-token input), and the W4A16Fp4 / W4A4Fp4 NVFP4 schemes selected for
        # nvfp4-pack-quantized (test/.../test_fp4_linear_scheme_selection: W4A4 on SM100, weight-only below).
        "int4_awq": COMPRESSED_TENSORS, "int8_wo": COMPRESSED_TENSORS, "int8_sq": COMPRESSED_TENSORS,
        "fp8_pc_pt": COMPRESSED_TENSORS, "w4a16_nvfp4": COMPRESSED_TENSORS, "nvfp4_awq": COMPRESSED_TENSORS,
    },
}

KV_CACHE = {
    "trtllm": {
        MODELOPT: ("none", "fp8", "nvfp4"),  # kv_cache_quant_algo FP8 / NVFP4 (§7.3)
        TRTLLM_LEGACY: ("none", "fp8"),  # checkpoint.md: KV algorithms FP8, INT8
    },
    "vllm": {
        MODELOPT: ("none", "fp8"),  # NVFP4 KV: see KV_FOOTNOTES
        # compressed_tensors.py returns CompressedTensorsKVCacheMethod for attention layers; scales are
        # the compressed-tensors package's `<attn>.k_scale` / `<attn>.v_scale`.
        COMPRESSED_TENSORS: ("none", "fp8"),
    },
    "sglang": {
        MODELOPT: ("none", "fp8"),  # §7.2 (FP8 KV scales remapped from k_proj.k_scale); NVFP4 KV not verified
        COMPRESSED_TENSORS: ("none",),  # its CompressedTensorsConfig gives attention layers no KV method
    },
}

# The formats an engine takes as the layers of one MIXED_PRECISION unified checkpoint (AutoQuantize).
# vLLM: model_executor/layers/quantization/modelopt.py, ModelOptMixedPrecisionConfig.get_quant_method maps
# a layer's quant_algo FP8, NVFP4, W4A16_NVFP4 or MXFP8 to its sub-config and gives any other layer
# UnquantizedLinearMethod (its packed weights would be misread). SGLang modelopt_quant.py: FP8 and NVFP4
# layers (§7.2). TensorRT-LLM builds each listed layer with its own QuantConfig (§7.3): every format it
# serves in the unified checkpoint.
MIXED_PRECISION_LAYERS = {
    "trtllm": tuple(q for q, dialect in SERVING["trtllm"].items() if dialect == MODELOPT),
    "vllm": ("fp8", "nvfp4", "w4a16_nvfp4", "mxfp8"),
    "sglang": ("fp8", "nvfp4"),
}

# Conditions a table cell cannot show, per (engine, qformat); the exporter enforces the first kind.
_NO_PQS = ("only without pre_quant_scale: calibrated with PTQConfig(pre_quant_scales='fold'), the default, which "
           "folds every AWQ scale into the norms and into v_proj's and up_proj's rows (export checks)")
_NO_SQ_PQS = _NO_PQS.replace("AWQ", "SmoothQuant")
_LEGACY_SQ = ("for `trtllm-build`: W8A8_SQ_PER_CHANNEL builds Int8SmoothQuantLinear layers, whose parameters carry "
              "ModelOpt's names (TensorRT-LLM tensorrt_llm/quantization/quantize.py, layers.py); names and shapes "
              "checked here, no engine built")
_TORCH_W8A16 = ("TensorRT-LLM's PyTorch backend (tensorrt_llm/_torch/modules/linear.py, WeightOnlyQuantLinearMethod), "
                "which holds the per-channel scales in the model dtype")
FOOTNOTES = {
    ("vllm", "int4_awq"): _NO_PQS, ("sglang", "int4_awq"): _NO_PQS,
    ("vllm", "nvfp4_awq"): _NO_PQS, ("sglang", "nvfp4_awq"): _NO_PQS,
    ("vllm", "int8_sq"): _NO_SQ_PQS,
    ("sglang", "int8_sq"): _NO_SQ_PQS + "; SGLang quantizes activations per token, not with the static scale",
    ("trtllm", "int8_sq"): _LEGACY_SQ, ("trtllm", "int8_wo"): _TORCH_W8A16,
}
# Conditions of a KV-cache cell, per (engine, dialect).
KV_FOOTNOTES = {
    ("vllm", MODELOPT): (
        "no NVFP4 KV cache: vLLM reads config.json's quantization_config before hf_quant_config.json "
        "(vllm/model_executor/model_loader/weight_utils.py, get_quant_config), and that flat form maps only an "
        "FP8 `kv_cache_scheme` dict to a KV-cache method (vllm/model_executor/layers/quantization/modelopt.py, "
        "ModelOptQuantConfigBase.from_config); an NVFP4 KV cache is dropped"),
}


def _check_names(engine: str, qformats=(), kv_cache_qformat: str = "none") -> None:
    """ValueError naming the valid choices for an unknown engine, qformat or kv_cache_qformat."""
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; valid: {', '.join(ENGINES)}")
    for qformat in qformats:
        get_format(qformat)
    get_kv_format(kv_cache_qformat)


def dialect_for(engine: str, qformat: str, kv_cache_qformat: str = "none") -> Optional[str]:
    """The dialect `engine` serves `qformat` (with that KV cache) in, or None."""
    _check_names(engine, [qformat], kv_cache_qformat)
    dialect = SERVING[engine].get(qformat)
    return dialect if kv_cache_qformat in KV_CACHE[engine].get(dialect, ()) else None


def engines_serving(qformat: str, kv_cache_qformat: str = "none") -> Dict[str, str]:
    """{engine: dialect} of the engines that serve `qformat` with `kv_cache_qformat`."""
    return engines_serving_formats([qformat], kv_cache_qformat)


def mixed_dialect_for(engine: str, qformats, kv_cache_qformat: str = "none") -> Optional[str]:
    """MODELOPT if `engine` serves a MIXED_PRECISION checkpoint of these per-layer formats, else None."""
    _check_names(engine, qformats, kv_cache_qformat)
    mixable = all(q in MIXED_PRECISION_LAYERS[engine] for q in qformats)
    return MODELOPT if mixable and kv_cache_qformat in KV_CACHE[engine][MODELOPT] else None


def engines_serving_formats(qformats, kv_cache_qformat: str = "none") -> Dict[str, str]:
    """{engine: dialect} of the engines serving a model of these formats (per layer when several)."""
    found = {engine: dialect_for(engine, qformats[0], kv_cache_qformat) if len(qformats) == 1
             else mixed_dialect_for(engine, qformats, kv_cache_qformat) for engine in ENGINES}
    return {engine: dialect for engine, dialect in found.items() if dialect is not None}


def describe_serving(qformat: str, kv_cache_qformat: str = "none", dialects: Tuple[str, ...] = DIALECTS) -> str:
    """"trtllm (modelopt), vllm (compressed-tensors)", or "no engine" (for error messages).

    `dialects` narrows the list to engines serving the format in one of them, for a refusal that rules
    a dialect out (a layer the compressed-tensors layout cannot express).
    """
    serving = {e: d for e, d in engines_serving(qformat, kv_cache_qformat).items() if d in dialects}
    return ", ".join(f"{engine} ({dialect})" for engine, dialect in serving.items()) or "no engine"


# vLLM names the ModelOpt loader per family (vllm docs/features/quantization/modelopt.md); without the
# flag it detects the method from hf_quant_config.json / config.json, as it does for compressed-tensors.
_VLLM_MODELOPT_METHOD = {"nvfp4": "modelopt_fp4", "w4a16_nvfp4": "modelopt_fp4", "mxfp8": "modelopt_mxfp8"}


def serve_command(engine: str, path: str, qformat: Optional[str] = None) -> str:
    """The shell command that serves the checkpoint at `path` with `engine`.

    Without `qformat` the command relies on the engine detecting the method from config.json (vLLM and
    SGLang do; SGLang's docs say not to pass --quantization for pre-quantized models). With it,
    vLLM gets its explicit ModelOpt method, a TensorRT-LLM legacy checkpoint is built first
    (`trtllm-build`, then `trtllm-serve <engine dir> --backend tensorrt`), and a qformat the engine does
    not serve is a ValueError naming the engines that do.
    """
    _check_names(engine)
    dialect = MODELOPT if qformat is None else SERVING[engine].get(get_format(qformat).name)
    if dialect is None:
        raise ValueError(f"{engine} does not serve qformat {qformat!r}; engines that can (dialect): "
                         f"{describe_serving(qformat)}")
    if engine == "vllm":
        method = _VLLM_MODELOPT_METHOD.get(qformat, "modelopt") if qformat and dialect == MODELOPT else None
        return f"vllm serve {path}" + (f" --quantization {method}" if method else "")
    if engine == "sglang":
        return f"python -m sglang.launch_server --model-path {path}"
    if dialect == TRTLLM_LEGACY:
        engine_dir = f"{path.rstrip('/')}-engine"
        return (f"trtllm-build --checkpoint_dir {path} --output_dir {engine_dir} && "
                f"trtllm-serve {engine_dir} --backend tensorrt --tokenizer {path}")
    return f"trtllm-serve {path}"


def markdown_table() -> str:
    """The README's serving table: one row per qformat, one column per engine, then KV formats."""
    lines = ["| qformat | " + " | ".join(ENGINES) + " |", "|---|" + "---|" * len(ENGINES)]
    notes = []
    for qformat in FORMATS:
        cells = []
        for engine in ENGINES:
            dialect = SERVING[engine].get(qformat)
            mark = _mark(notes, FOOTNOTES.get((engine, qformat)))
            cells.append("-" if dialect is None else f"{dialect}{mark}")
        lines.append(f"| `{qformat}` | " + " | ".join(cells) + " |")
    mixed = ["/".join(f"`{q}`" for q in MIXED_PRECISION_LAYERS[engine]) for engine in ENGINES]
    lines.append("| per-layer formats (MIXED_PRECISION, modelopt) | " + " | ".join(mixed) + " |")
    kv = [", ".join(f"{d}: {'/'.join(k)}{_mark(notes, KV_FOOTNOTES.get((engine, d)))}"
                    for d, k in KV_CACHE[engine].items()) for engine in ENGINES]
    lines.append("| KV cache | " + " | ".join(kv) + " |")
    lines += [""] + [f"[^{i}]: {note}" for i, note in enumerate(notes, 1)]
    return "\n".join(lines) + "\n"


def _mark(notes: list, note: Optional[str]) -> str:
    """The footnote mark of `note` ("" for None), adding it to `notes` the first time."""
    if note is None:
        return ""
    if note not in notes:
        notes.append(note)
    return f"[^{notes.index(note) + 1}]"


README_START = "<!-- engines-table:start (generated: python -m hf_ptq_plugin.export.engines README.md) -->"
README_END = "<!-- engines-table:end -->"


def readme_section(text: str) -> str:
    """What README text holds between the table markers; a ValueError if the markers are missing."""
    return marked_section(text, README_START, README_END)


def update_readme(path) -> bool:
    """Rewrite the table between the markers of the README at `path`; True when it changed."""
    return replace_marked_section(path, README_START, README_END, markdown_table())


if __name__ == "__main__":  # python -m hf_ptq_plugin.export.engines README.md
    import logging
    import sys

    logging.basicConfig(level=logging.INFO)
    target = sys.argv[1] if len(sys.argv) > 1 else "README.md"
    changed = update_readme(target)
    logging.getLogger(__name__).info("%s: engines table %s", target, "updated" if changed else "already current")
