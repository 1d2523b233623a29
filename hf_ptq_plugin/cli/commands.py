"""The `hf-ptq` subcommands: quantize, eval, export, push, upgrade (parsed arguments in, summary printed out).

A ValueError or OSError raised here becomes the CLI's one-line error (a damaged safetensors file too:
`load_model` turns safetensors' own error into a ValueError naming the file). Each command is a thin
sequence of library calls: load with transformers, `quantize` / `calibrate`, `evaluation.perplexity`,
`export_checkpoint` (which writes the tokenizer files and the model card too), `push_to_hub`.
"""

import logging
import socket
import time
from pathlib import Path
from typing import List, Optional, Tuple
from urllib.parse import urlparse

import huggingface_hub.constants
import torch
from safetensors import SafetensorError, safe_open
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

from ..api import quantize
from ..calibration.data import calibration_forward_loop, load_texts
from ..calibration.images import image_text_forward_loop, load_captioned_images, synthetic_captioned_images
from ..calibration.record import describe_source
from ..calibration.text import first_windows, read_text, tokenize
from ..config import PTQConfig
from ..evaluation import perplexity
from ..export import export_checkpoint, export_target_dialect, formats_dialect
from ..export.hub import push_to_hub
from ..export.model_card import EvaluationRecord, card_facts, warn_if_local_base_model
from ..hf.upgrade import needs_upgrade, upgrade_checkpoint, upgrade_message
from .autoquant import auto_quantize_rows, auto_quantized, check_auto_arguments, parse_qformats
from .tasks import mmlu_tasks, task_rows, wants_tasks

logger = logging.getLogger(__name__)

DTYPES = ("auto", "bfloat16", "float16", "float32")
DEFAULT_BATCH_SIZE = 4


def load_model(source: str, args, quantization_config: Optional[PTQConfig] = None):
    if args.dtype not in DTYPES:
        raise ValueError(f"unknown --dtype {args.dtype!r}; valid: {', '.join(DTYPES)}")
    kwargs = {"dtype": args.dtype if args.dtype == "auto" else getattr(torch, args.dtype),
              "trust_remote_code": args.trust_remote_code}
    if torch.cuda.is_available():
        kwargs["device_map"] = "auto"
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    check_source(source)
    if needs_upgrade(source):
        raise ValueError(upgrade_message(source))
    # Images go through the whole vision-language model; the causal-LM class may load its text part only.
    auto_class = AutoModelForImageTextToText if getattr(args, "calib_images", None) else AutoModelForCausalLM
    try:
        return auto_class.from_pretrained(source, **kwargs).eval()
    except SafetensorError as error:  # a damaged or truncated weights file read by transformers itself
        raise ValueError(f"{_unreadable_safetensors(source)!r} is not a readable safetensors file: {error}") from None


def _unreadable_safetensors(source: str) -> str:
    """The first local safetensors file of `source` that does not open (`source` itself if none is found)."""
    for path in sorted(Path(source).glob("*.safetensors")) if Path(source).is_dir() else ():
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except SafetensorError:
            return str(path)
    return source


def load_tokenizer(source: str, args):
    check_source(source)
    return AutoTokenizer.from_pretrained(source, trust_remote_code=args.trust_remote_code)


def check_source(source: str) -> None:
    """A missing local folder is an error here, before transformers takes it for a Hub id and retries the
    network; a Hub id when the Hub's host does not resolve is read from the local cache only."""
    if Path(source).exists():
        return
    if source.startswith(("/", ".", "~")) or source.count("/") > 1:
        raise ValueError(f"no such model folder: {source!r} (a Hub model id is 'name' or 'namespace/name')")
    hub = urlparse(huggingface_hub.constants.ENDPOINT)
    if not huggingface_hub.constants.HF_HUB_OFFLINE and not _resolves(hub):
        # Without this, each file request retries for about a minute before transformers looks in the cache.
        logger.warning("%s does not resolve: reading %r from the local Hub cache only (as HF_HUB_OFFLINE=1)",
                       hub.hostname, source)
        huggingface_hub.constants.HF_HUB_OFFLINE = True


def _resolves(url) -> bool:
    try:
        socket.getaddrinfo(url.hostname, url.port or 443)
        return True
    except OSError:
        return False


def eval_windows(tokenizer, seq_len: int, windows: int, text: Optional[str] = None, dataset: Optional[str] = None):
    """(windows (n, seq_len), description of the text) from a text file/folder or any calibration source."""
    if (text is None) == (dataset is None):
        raise ValueError("evaluation needs exactly one text: --text FILE (a .txt file or folder) or --dataset NAME")
    content = read_text(text) if text is not None else "\n\n".join(load_texts(dataset))
    return first_windows(tokenize(tokenizer, content), seq_len, windows), describe_source(text or dataset)


def _ptq_config(args, qformat: str) -> PTQConfig:
    exclude = [name.strip() for name in args.exclude_modules.split(",") if name.strip()]
    return PTQConfig(qformat=qformat, kv_cache_qformat=args.kv_cache_qformat, algorithm=args.algorithm,
                     group_size=args.group_size, exclude_modules=exclude, calib_dataset=args.calib_dataset,
                     calib_size=args.calib_size, calib_seq_len=args.calib_seq_len,
                     calib_batch_size=args.calib_batch_size or DEFAULT_BATCH_SIZE, sequential=args.sequential)


def run_quantize(args) -> None:
    start = time.perf_counter()
    if args.eval_mmlu_file and not args.eval_text:
        raise ValueError("--eval_mmlu_file is recorded with the perplexity evaluation: pass --eval_text FILE too")
    qformats = parse_qformats(args.qformat)
    searched = args.auto_quantize_bits is not None
    if len(qformats) > 1 and not searched:
        raise ValueError(f"--qformat {args.qformat!r} names several formats: pass --auto_quantize_bits N to choose "
                         "among them per layer group, or give one format")
    quantized = [q for q in qformats if q != "none"]
    config = _ptq_config(args, quantized[0])
    if searched:
        check_auto_arguments(args, config, qformats)
    if args.calib_images and (searched or args.low_memory_mode):
        raise ValueError("--calib_images calibrates a model loaded in full precision with one format; with "
                         "--auto_quantize_bits or --low_memory_mode pass images through the Python API "
                         "(hf_ptq_plugin.calibration.images)")
    images = captioned_images(args.calib_images) if args.calib_images else None  # a bad spec fails before loading
    if not searched and config.cannot_run_without_data and config.calib_dataset is None and images is None:
        raise ValueError(f"qformat {config.qformat!r} with algorithm {config.resolved_algorithm!r} and "
                         f"kv_cache_qformat {config.kv_cache_qformat!r} needs calibration data: "
                         "pass --dataset FILE (.txt, .json, .jsonl, .parquet or a folder of them)")
    # fail before work: a search may pick any of its formats
    dialect = formats_dialect(args.export_target, quantized, config.kv_cache_qformat)
    # A local source's tokenizer files come along with the export; a Hub source's are saved from the tokenizer.
    needs_tokenizer = config.calib_dataset or args.eval_text or not Path(args.model).is_dir()
    tokenizer = load_tokenizer(args.model, args) if needs_tokenizer else None
    windows, eval_data = (eval_windows(tokenizer, args.eval_seq_len, args.eval_windows, text=args.eval_text)
                          if args.eval_text else (None, None))
    model, before, result = _quantized_model(args, config, qformats, tokenizer, windows, images)
    evaluation = None
    if windows is not None:
        after = perplexity(model, windows, config.calib_batch_size, progress="perplexity after")
        evaluation = EvaluationRecord(eval_data, windows.shape[0], windows.shape[1], after, before,
                                      tasks=mmlu_tasks(model, tokenizer, args, config.calib_batch_size))
    if args.export_path:
        if not args.push_to_hub:  # the push warns itself
            warn_if_local_base_model(model, args.base_model)
        export_checkpoint(model, args.export_path, target=args.export_target, tokenizer=tokenizer,
                          base_model=args.base_model, evaluation=evaluation)
    commit = _push(model, args.push_to_hub, tokenizer, args, evaluation) if args.push_to_hub else None
    rows = _quantize_summary(model, args, evaluation, dialect, commit, time.perf_counter() - start)
    print_summary(rows[:-1] + (auto_quantize_rows(args, result) if result is not None else []) + rows[-1:])


def _quantized_model(args, config: PTQConfig, qformats: List[str], tokenizer, windows, images=None):
    """(quantized model, perplexity before or None, AutoQuantize result or None); low-memory mode never
    holds the full-precision model."""
    if args.low_memory_mode:  # quantized while loading, then calibrated from the checkpoint's weights
        return load_model(args.model, args, config), None, None
    model = load_model(args.model, args)
    before = None if windows is None else perplexity(model, windows, config.calib_batch_size,
                                                      progress="perplexity before")
    if args.auto_quantize_bits is not None:
        model, result = auto_quantized(model, args, config, qformats, tokenizer, windows)
        return model, before, result
    loop = None
    if config.calib_dataset is not None:
        loop = calibration_forward_loop(tokenizer, config.calib_dataset, config.calib_size, config.calib_seq_len,
                                        config.calib_batch_size)
    if images is not None:
        processor = AutoProcessor.from_pretrained(args.model, trust_remote_code=args.trust_remote_code)
        loop = image_text_forward_loop(processor, images, config.calib_batch_size, text_loop=loop)
    return quantize(model, config, loop), before, None


def captioned_images(spec: str):
    """--calib_images: "synthetic:N" or a folder with captions.jsonl."""
    if spec.startswith("synthetic:"):
        count = spec.split(":", 1)[1]
        if not count.isdigit() or int(count) < 1:
            raise ValueError(f"--calib_images {spec!r}: synthetic:N needs a positive number of images N")
        return synthetic_captioned_images(int(count))
    return load_captioned_images(spec)


def _push(model, repo_id: str, tokenizer, args, evaluation=None):
    if args.token:
        logger.warning("--token is visible to other users in the process list; prefer the HF_TOKEN environment "
                       "variable or `hf auth login`")
    return push_to_hub(model, repo_id, tokenizer=tokenizer, private=args.private, token=args.token,
                       commit_message=args.commit_message, revision=args.revision, create_pr=args.create_pr,
                       base_model=args.base_model, evaluation=evaluation, endpoint=args.endpoint)


def _quantize_summary(model, args, evaluation, dialect: str, commit, seconds: float) -> List[Tuple[str, str]]:
    facts = card_facts(model, args.base_model, evaluation)
    record = facts.calibration
    rows = [("model", args.model),
            ("format", f"{', '.join(facts.qformats)} ({facts.quant_algo}), group size {facts.group_size or '-'}"),
            ("algorithm", facts.algorithm or "not recorded"), ("KV cache", facts.kv_cache_qformat),
            ("layers quantized", str(facts.layers)),
            ("bytes before", f"{facts.bytes_before:,} ({facts.bytes_before / 1e6:.2f} MB)"),
            ("bytes after", f"{facts.bytes_after:,} ({facts.bytes_after / 1e6:.2f} MB, "
                            f"{facts.bytes_after / facts.bytes_before:.1%})"),
            ("calibration", "none" if record is None else
             f"{record['samples']} samples x <= {record['max_seq_len']} tokens from {record['source']}"),
            ("perplexity", _perplexity_text(evaluation)),
            *[(task, f"acc {r['acc']:.4f} +/- {r['acc_stderr']:.4f}  ({r['n']} questions)")
              for task, r in (evaluation.tasks.items() if evaluation else ())],
            ("export", f"{args.export_path} ({args.export_target}: {dialect})" if args.export_path
             else "not written (pass --export_path)")]
    if commit is not None:
        rows.append(("pushed", commit.pr_url or commit.commit_url))
    rows.append(("seconds", f"{seconds:.1f}"))
    return rows


def _perplexity_text(evaluation) -> str:
    if evaluation is None:
        return "not measured (pass --eval_text)"
    where = f"on {evaluation.windows} x {evaluation.seq_len} tokens of {evaluation.data}"
    if evaluation.before is None:
        return f"after {evaluation.after:.4f} {where} (before not measured in low-memory mode)"
    return (f"before {evaluation.before:.4f}, after {evaluation.after:.4f} "
            f"(x{evaluation.after / evaluation.before:.4f}) {where}")


def print_summary(rows: List[Tuple[str, str]]) -> None:
    width = max(len(key) for key, _ in rows)
    for key, value in rows:
        print(f"{key.ljust(width)}  {value}")


def run_eval(args) -> None:
    start = time.perf_counter()
    tokenizer = load_tokenizer(args.model, args)
    with_text = args.text is not None or args.dataset is not None or not wants_tasks(args)
    if with_text:
        windows, data = eval_windows(tokenizer, args.seq_len, args.windows, text=args.text, dataset=args.dataset)
    rows, results = [], {}
    for label, source in (("baseline", args.baseline), ("model", args.model)):
        if source is None:
            continue
        model = load_model(source, args)
        if with_text:
            results[label] = perplexity(model, windows, args.batch_size, progress=f"perplexity {label}")
            rows.append((f"{label} perplexity", f"{results[label]:.4f}  ({source})"))
        rows += task_rows(model, tokenizer, args, label)
        del model
    if "baseline" in results:
        rows.append(("ratio", f"{results['model'] / results['baseline']:.4f}"))
    if with_text:
        rows.append(("text", f"{windows.shape[0]} windows x {windows.shape[1]} tokens of {data}"))
    print_summary(rows + [("seconds", f"{time.perf_counter() - start:.1f}")])


def run_export(args) -> None:
    model = load_model(args.model, args)
    config = getattr(model, "ptq_config", None)
    if config is None:
        raise ValueError(f"{args.model!r} is not a checkpoint quantized by hf_ptq_plugin or ModelOpt (no "
                         "quantization_config with quant_method 'modelopt' in its config.json)")
    dialect = export_target_dialect(args.export_target, config.qformat, config.kv_cache_qformat)
    warn_if_local_base_model(model, args.base_model)
    export_checkpoint(model, args.export_path, target=args.export_target, base_model=args.base_model)
    print_summary([("exported", args.model), ("to", f"{args.export_path} ({args.export_target}: {dialect})")])


def run_push(args) -> None:
    model = load_model(args.model, args)
    commit = _push(model, args.repo_id, None, args)  # tokenizer files come along from the checkpoint directory
    print_summary([("pushed", args.model), ("to", commit.pr_url or commit.commit_url)])


def run_upgrade(args) -> None:
    written = upgrade_checkpoint(args.model)
    if written is None:
        print_summary([("unchanged", args.model), ("reason", "config.json already has a quantization_config")])
    else:
        print_summary([("upgraded", args.model), ("quant_algo", str(written["quant_algo"])),
                       ("wrote", "quantization_config in config.json (from hf_quant_config.json)")])


COMMANDS = {"quantize": run_quantize, "eval": run_eval, "export": run_export, "push": run_push,
            "upgrade": run_upgrade}
