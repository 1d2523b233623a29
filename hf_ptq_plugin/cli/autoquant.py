"""`hf-ptq quantize --qformat a,b --auto_quantize_bits N`: the AutoQuantize search from the command line.

The candidates calibrate on the --dataset samples, the first --auto_quantize_score_size of them
score the candidates, and --auto_quantize_frontier measures the perplexity of other budgets' choices
from the same search (written as a CSV and a PNG).
"""

import math
from collections import Counter
from typing import List, Tuple

from ..autoquant import auto_quantize
from ..autoquant.frontier import FrontierPoint, write_frontier
from ..autoquant.search import METHODS, candidate_algorithms
from ..calibration.data import CalibrationLoop, calibration_forward_loop
from ..config import PTQConfig
from ..evaluation import perplexity


def parse_qformats(value: str) -> List[str]:
    qformats = [q.strip() for q in value.split(",") if q.strip()]
    if not [q for q in qformats if q != "none"]:
        raise ValueError(f"--qformat {value!r} names no quantized format")
    return qformats


def frontier_budgets(args) -> List[float]:
    if not args.auto_quantize_frontier:
        return []
    try:
        return [float(b) for b in args.auto_quantize_frontier.split(",") if b.strip()]
    except ValueError:
        raise ValueError(f"--auto_quantize_frontier takes comma-separated numbers of bits, got "
                         f"{args.auto_quantize_frontier!r}") from None


def check_auto_arguments(args, config: PTQConfig, qformats: List[str]) -> None:
    """ValueError, before any work, for what the search cannot do with these arguments."""
    candidate_algorithms(qformats, _algorithms(args, qformats), args.group_size)  # names, algorithms, group size
    if args.auto_quantize_method not in METHODS:
        raise ValueError(f"unknown --auto_quantize_method {args.auto_quantize_method!r}; valid: {', '.join(METHODS)}")
    if config.calib_dataset is None:
        raise ValueError("--auto_quantize_bits needs calibration data (the candidates are calibrated and scored "
                         "on it): pass --dataset FILE")
    if args.low_memory_mode:
        raise ValueError("--auto_quantize_bits needs the full-precision model in memory (it compares formats on "
                         "it); drop --low_memory_mode")
    if args.sequential is not None:
        raise ValueError("--sequential / --no_sequential is not an AutoQuantize setting: each candidate format "
                         "calibrates as quantize() does by default")
    if args.auto_quantize_score_size < 1:
        raise ValueError(f"--auto_quantize_score_size must be at least 1, got {args.auto_quantize_score_size}")
    if frontier_budgets(args):
        if not args.eval_text:
            raise ValueError("--auto_quantize_frontier measures perplexity: pass --eval_text FILE")
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise ValueError("--auto_quantize_frontier draws its PNG with matplotlib: pip install "
                             "'hf-ptq-plugin[plot]'") from None


def auto_quantized(model, args, config: PTQConfig, qformats: List[str], tokenizer, windows):
    """(model, result) of the search, the frontier written when asked."""
    loop = calibration_forward_loop(tokenizer, config.calib_dataset, config.calib_size, config.calib_seq_len,
                                    config.calib_batch_size)
    score_batches = math.ceil(args.auto_quantize_score_size / config.calib_batch_size)
    score_loop = CalibrationLoop(loop.batches[:score_batches], source=loop.source)
    budgets = frontier_budgets(args)
    evaluate = None
    if budgets:
        def evaluate(candidate_model):
            return perplexity(candidate_model, windows, config.calib_batch_size, progress="frontier perplexity")
    model, result = auto_quantize(model, qformats, args.auto_quantize_bits, loop,
                                  method=args.auto_quantize_method, algorithms=_algorithms(args, qformats),
                                  group_size=args.group_size, exclude_modules=config.exclude_modules,
                                  kv_cache_qformat=config.kv_cache_qformat, score_loop=score_loop,
                                  frontier_bits=budgets, evaluate=evaluate)
    if budgets:
        write_frontier([FrontierPoint(**p) for p in result.frontier], args.frontier_path)
    return model, result


def _algorithms(args, qformats: List[str]):
    """--algorithm applies to every candidate format (each must accept it), else each format's default."""
    return {q: args.algorithm for q in qformats if q != "none"} if args.algorithm else None


def auto_quantize_rows(args, result) -> List[Tuple[str, str]]:
    """Summary lines: the achieved bits, the groups per format, the frontier files."""
    chosen = Counter(result.choice.values())
    rows = [("AutoQuantize", f"{result.effective_bits:.3f} effective bits (budget {result.target_bits}, "
                             f"{result.true_bits:.3f} stored), {result.method} scores"),
            ("groups per format", ", ".join(f"{q} {n}" for q, n in sorted(chosen.items())))]
    if result.frontier:
        rows.append(("frontier", f"{args.frontier_path}.csv, {args.frontier_path}.png ("
                                 + ", ".join(f"{p['target_bits']:g} bits: {p['metric']:.3f}" for p in result.frontier)
                                 + ")"))
    return rows
