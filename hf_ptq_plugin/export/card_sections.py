"""The Markdown sections of the model card, one small function each, from `model_card.CardFacts`.

Each states only what the facts hold: no calibration record gives "not recorded", no evaluation
gives "no evaluation was run". Serving instructions come from `engines.py` (which engine reads
which checkpoint layout, and the command that serves it).
"""

from pathlib import Path
from typing import Dict, List, Optional

from .engines import ENGINES, engines_serving_formats, serve_command

ENGINE_NAMES = {"trtllm": "TensorRT-LLM", "vllm": "vLLM", "sglang": "SGLang"}
DIALECT_NAMES = {"modelopt": "ModelOpt unified (`quant_method: modelopt`)", "compressed-tensors": "compressed-tensors",
                 "trtllm-legacy": "legacy TensorRT-LLM"}


def summary(facts, dialect: str) -> str:
    base = facts.base_model
    if base is None:
        source = "A Hugging Face Transformers model"
    elif _is_hub_id(base):
        source = f"[`{base}`](https://huggingface.co/{base})"
    else:
        source = f"`{base}`"
    layout = DIALECT_NAMES.get(dialect, dialect)
    target = (f"`{facts.qformat}`" if len(facts.qformats) == 1 else
              f"a format per layer group ({qformats(facts.qformats)}, chosen by AutoQuantize)")
    return f"{source}, post-training quantized to {target} with hf-ptq-plugin; checkpoint layout: {layout}."


def qformats(names: List[str]) -> str:
    return ", ".join(f"`{name}`" for name in names)


def layer_formats(table: Dict[str, Dict[str, int]], effective_bits: Optional[float]) -> str:
    """Per-layer formats: layers of each type per format, and the effective bits ("" for one format)."""
    if not table:
        return ""
    columns = sorted({q for counts in table.values() for q in counts}, key=lambda q: (q == "none", q))
    lines = [f"Per-layer formats ({effective_bits:.3f} effective bits per weight of these layers; full precision "
             "counts 16):", "", "| layer | " + " | ".join(f"`{q}`" for q in columns) + " |",
             "|---|" + "---|" * len(columns)]
    lines += [f"| `{kind}` | " + " | ".join(str(counts.get(q, 0)) for q in columns) + " |"
              for kind, counts in table.items()]
    return "\n".join(lines)


def _is_hub_id(name: str) -> bool:
    return name.count("/") <= 1 and not name.startswith((".", "/", "~")) and not Path(name).exists()


def code_or(value) -> str:
    return "not recorded" if value is None else f"`{value}`"


def kv_cache(kv_cache_qformat: str) -> str:
    return "not quantized" if kv_cache_qformat == "none" else f"`{kv_cache_qformat}` (calibrated `k_scale` / `v_scale`)"


def excluded(names: List[str]) -> str:
    return ", ".join(f"`{name}`" for name in names) if names else "none"


def size(before: int, after: int) -> str:
    return (f"{before / 1e6:.2f} MB before, {after / 1e6:.2f} MB after ({after / before:.1%}; "
            f"{before:,} -> {after:,} bytes)")


def calibration(facts) -> str:
    record = facts.calibration
    if not facts.calibration_known:
        return "Not recorded: this model carries no record of the data it was calibrated on."
    if record is None:
        return (f"No calibration data: weights were quantized from their own values ({code_or(facts.algorithm)}), "
                "and the format has no static activation scale that would need data.")
    if record.get("samples") is None:
        return f"Data: {record.get('source') or 'a custom forward loop'} (sample count and lengths not recorded)."
    return (f"Data: {record['source']}; {record['samples']} samples of at most {record['max_seq_len']} tokens "
            f"({record['tokens']:,} tokens in all; padding excluded from every statistic).")


def evaluation(result) -> str:
    if result is None:
        return "No evaluation was run for this checkpoint."
    text = (f"Perplexity on {result.windows} windows of {result.seq_len} tokens of {result.data}:\n\n"
            "| model | perplexity |\n|---|---|\n")
    if result.before is not None:
        text += f"| before quantization | {result.before:.4f} |\n"
    text += f"| quantized | {result.after:.4f} |\n"
    if result.before is not None:
        text += f"\nRatio after / before: {result.after / result.before:.4f}."
    if result.tasks:
        text += ("\n\nBenchmarks of the quantized model (zero-shot):\n\n"
                 "| task | accuracy | standard error | questions |\n|---|---|---|---|\n")
        text += "".join(f"| {task} | {r['acc']:.4f} | {r['acc_stderr']:.4f} | {r['n']} |\n"
                        for task, r in result.tasks.items())
    return text


def transformers_usage(model_id: str, dialect: str) -> str:
    load = ("from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            f"model = AutoModelForCausalLM.from_pretrained(\"{model_id}\")\n"
            f"tokenizer = AutoTokenizer.from_pretrained(\"{model_id}\")\n```\n\n")
    if dialect == "compressed-tensors":
        return ("```python\n" + load + "`pip install compressed-tensors`; transformers loads this layout without "
                "hf-ptq-plugin. NVFP4 checkpoints compute in bfloat16 there (the package decompresses their weights "
                "to bfloat16).")
    if dialect != "modelopt":
        return (f"This directory holds the {DIALECT_NAMES.get(dialect, dialect)} layout, written for serving engines. "
                "To run the model in transformers, load the unified checkpoint it was exported from, after "
                "`import hf_ptq_plugin`.")
    return ("```python\nimport hf_ptq_plugin  # first: registers quant_method \"modelopt\" with transformers\n" + load
            + "`pip install hf-ptq-plugin`. Without `import hf_ptq_plugin`, transformers only warns about the unknown "
            "quantization method and loads the quantized tensors as if they were plain weights.")


def serving(qformats: List[str], kv_cache_qformat: str, model_id: str, dialect: str) -> str:
    """One subsection per engine: how to serve this checkpoint, or what it needs first, or that it cannot."""
    accepted = engines_serving_formats(qformats, kv_cache_qformat)
    # Per-layer formats: the engines detect the method from config.json (vLLM: modelopt_mixed).
    qformat = qformats[0] if len(qformats) == 1 else None
    parts = []
    for engine in ENGINES:
        name, engine_dialect = ENGINE_NAMES.get(engine, engine), accepted.get(engine)
        parts.append(f"### {name}\n\n" + _engine_text(engine, engine_dialect, qformat, kv_cache_qformat, model_id,
                                                       dialect))
    return "\n\n".join(parts)


def _engine_text(engine: str, engine_dialect: Optional[str], qformat: str, kv: str, model_id: str, dialect: str) -> str:
    if engine_dialect is None:
        kv_note = f" with a `{kv}` KV cache" if kv != "none" else ""
        what = f"`{qformat}`" if qformat else "these per-layer formats in one checkpoint"
        return f"Does not accept {what}{kv_note}."
    if engine_dialect == dialect:
        return f"```bash\n{serve_command(engine, model_id, qformat)}\n```"
    layout = DIALECT_NAMES.get(engine_dialect, engine_dialect)
    if dialect != "modelopt":
        return (f"Reads the {layout} layout: export it from the unified checkpoint with "
                f"`hf-ptq export <unified checkpoint> --export_path <dir> --export_target {engine}`.")
    exported = f"{model_id.rstrip('/').split('/')[-1]}-{engine}"
    return (f"Reads the {layout} layout; export it first, then serve the export:\n\n```bash\n"
            f"hf-ptq export {model_id} --export_path {exported} --export_target {engine}\n"
            f"{serve_command(engine, exported, qformat)}\n```")
