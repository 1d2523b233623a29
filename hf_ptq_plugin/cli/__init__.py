"""`hf-ptq`: the command line (`quantize`, `eval`, `export`, `push`, `upgrade`); the only module that prints.

Flag names follow ModelOpt's `examples/hf_ptq/hf_ptq.py` (`--pyt_ckpt_path`/`--model`, `--qformat`,
`--kv_cache_qformat`, `--calib_size`, `--calib_seq`, `--batch_size`, `--dataset`, `--export_path`,
`--trust_remote_code`, `--low_memory_mode`), with our longer names as aliases. This file builds the
parser and turns errors into one line; `commands.py` runs the subcommands. Entry points:
the `hf-ptq` script and `python -m hf_ptq_plugin`. Nothing imports this module.
"""

import argparse
import functools
import logging
import sys
from typing import List, Optional

from ..calibration.algorithms import ALGORITHMS
from ..export import EXPORT_TARGETS
from ..formats import FORMATS, KV_FORMAT_NAMES
from .commands import COMMANDS
from .tasks import add_task_arguments

PROG = "hf-ptq"


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: X)" where there is a default to show and the help does not already say it."""

    def _get_help_string(self, action):
        store_false = isinstance(action, argparse._StoreFalseAction)  # its default True says nothing of the flag
        if store_false or "default" in (action.help or "") or action.default in (None, False, "", argparse.SUPPRESS):
            return action.help
        return super()._get_help_string(action)


def at_least(minimum: int):
    """An argparse type: an integer >= `minimum` (a bad value is argparse's one-line usage error)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is below the minimum {minimum}")
        return value
    parse.__name__ = f"integer >= {minimum}"
    return parse


def _model_arguments(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("model", nargs="?", help=f"{what}: a local directory or a Hub id")
    parser.add_argument("--pyt_ckpt_path", "--model", dest="model_option", metavar="MODEL",
                        help="the same as the positional MODEL (ModelOpt's flag names)")
    parser.add_argument("--trust_remote_code", action="store_true", help="allow the model's own code from the Hub")
    parser.add_argument("--dtype", default="auto", help="compute dtype: auto (the checkpoint's), bfloat16, float16 "
                                                        "or float32")


def _hub_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--private", action="store_true", default=None, help="create the repo as private")
    parser.add_argument("--revision", help="branch to commit to (created if missing; default: main)")
    parser.add_argument("--create_pr", action="store_true", help="open a pull request instead of committing")
    parser.add_argument("--commit_message", help="default: 'Upload <qformat> checkpoint (hf-ptq-plugin)'")
    parser.add_argument("--token", help="Hub token; avoid it: a command line is visible to every user in `ps`. "
                                        "Default: the HF_TOKEN environment variable, else the token saved by "
                                        "`hf auth login`")
    parser.add_argument("--endpoint", help="another Hub endpoint (default: huggingface.co)")


def _card_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base_model", help="Hub id of the source model for the card (default: the source's "
                                             "name or path)")


def _add_quantize(subparsers) -> None:
    parser = subparsers.add_parser("quantize", help="quantize a model, optionally evaluate, export and push it")
    _model_arguments(parser, "the full-precision model")
    parser.add_argument("--qformat", default="fp8", help=f"weight/activation format: {', '.join(FORMATS)}; several, "
                                                         "comma-separated, with --auto_quantize_bits")
    parser.add_argument("--kv_cache_qformat", default="none", help=f"KV-cache format: {', '.join(KV_FORMAT_NAMES)}")
    parser.add_argument("--algorithm", help=f"calibration algorithm: {', '.join(ALGORITHMS)} (default: the "
                                            "format's own)")
    parser.add_argument("--group_size", type=int, help="block/group size (default: the format's own)")
    parser.add_argument("--exclude_modules", default="", help="comma-separated module names or fnmatch patterns kept "
                                                              "in full precision, on top of the defaults (lm_head...)")
    calib = parser.add_argument_group("calibration data")
    calib.add_argument("--dataset", "--calib_dataset", dest="calib_dataset",
                       help="a .txt/.json/.jsonl/.parquet file, a folder of them, or a Hub dataset name; needed by "
                            "formats with static activation scales, a quantized KV cache and every algorithm but max")
    calib.add_argument("--calib_images", help="vision-language models: also calibrate on captioned images, a folder "
                                              "with captions.jsonl ({\"image\": file, \"caption\": text} per line) "
                                              "or synthetic:N (N drawn scenes of coloured shapes, captioned)")
    calib.add_argument("--calib_size", type=at_least(1), default=512, help="number of samples")
    calib.add_argument("--calib_seq", "--calib_seq_len", dest="calib_seq_len", type=at_least(1), default=512,
                       help="tokens per sample (at most)")
    calib.add_argument("--batch_size", "--calib_batch_size", dest="calib_batch_size", type=at_least(0), default=4,
                       help="samples per forward pass; 0 means the default 4 (ModelOpt's 0 probes memory)")
    order = calib.add_mutually_exclusive_group()
    order.add_argument("--no_sequential", dest="sequential", action="store_false", default=None,
                       help="SmoothQuant/AWQ/GPTQ: feed each block full-precision outputs (one pass per block, "
                            "about half the time) instead of the quantized blocks' outputs")
    order.add_argument("--sequential", dest="sequential", action="store_true", default=None,
                       help="SmoothQuant/AWQ/GPTQ: feed each block the quantized blocks' outputs (without either "
                            "flag: the format's default)")
    _auto_quantize_arguments(parser)
    parser.add_argument("--low_memory_mode", action="store_true",
                        help="quantize while loading (from_pretrained with a PTQConfig), then calibrate")
    evaluation = parser.add_argument_group("evaluation (perplexity before and after, reported in the model card)")
    evaluation.add_argument("--eval_text", help="a .txt file or a folder of them")
    evaluation.add_argument("--eval_seq_len", type=at_least(2), default=512, help="tokens per window")
    evaluation.add_argument("--eval_windows", type=at_least(1), default=16, help="number of windows (from the start)")
    evaluation.add_argument("--eval_mmlu_file", help="with --eval_text: also score the quantized model on these MMLU "
                                                     "questions (.jsonl, as `hf-ptq eval --mmlu_file`)")
    evaluation.add_argument("--eval_limit", type=at_least(1), help="the first N questions of --eval_mmlu_file")
    output = parser.add_argument_group("output")
    _export_arguments(output, "write the checkpoint here (default: nothing is written)")
    output.add_argument("--push_to_hub", metavar="REPO_ID", help="push the unified checkpoint to this Hub repo")
    _hub_arguments(output)
    _card_arguments(output)


def _auto_quantize_arguments(parser: argparse.ArgumentParser) -> None:
    auto = parser.add_argument_group("AutoQuantize (a format per layer group among the --qformat list, and full "
                                     "precision, under an effective-bits budget; needs --dataset)")
    auto.add_argument("--auto_quantize_bits", type=float, help="effective bits per searched weight (nvfp4 = 4.5, "
                                                               "int4 = 4, fp8/int8 = 8, unquantized = 16)")
    auto.add_argument("--auto_quantize_method", default="gradient", help="sensitivity score: gradient or kl_div")
    auto.add_argument("--auto_quantize_score_size", type=at_least(1), default=128,
                      help="calibration samples that score the candidates (the first ones)")
    auto.add_argument("--auto_quantize_frontier", metavar="BITS",
                      help="comma-separated budgets: also measure the perplexity of each budget's choice (needs "
                           "--eval_text) and write the frontier as --frontier_path .csv and .png")
    auto.add_argument("--frontier_path", default="autoquantize_frontier",
                      help="file stem of the frontier: writes STEM.csv and STEM.png")


def _add_eval(subparsers) -> None:
    parser = subparsers.add_parser("eval", help="perplexity of a model (and of a baseline) on a text, and "
                                                "benchmark tasks (--tasks, --mmlu_file)")
    _model_arguments(parser, "the model to measure (quantized or not)")
    parser.add_argument("--text", help="a .txt file or a folder of them")
    parser.add_argument("--dataset", help="instead of --text: a .json/.jsonl/.parquet file or a Hub dataset name")
    parser.add_argument("--seq_len", type=at_least(2), default=512, help="tokens per window")
    parser.add_argument("--windows", type=at_least(1), default=16,
                        help="number of windows (from the start of the text)")
    parser.add_argument("--batch_size", type=at_least(1), default=4, help="windows per forward pass")
    parser.add_argument("--baseline", metavar="MODEL", help="also measure this model and print the ratio")
    add_task_arguments(parser, at_least(1))


def _add_export(subparsers) -> None:
    parser = subparsers.add_parser("export", help="re-export a quantized checkpoint for a serving engine")
    _model_arguments(parser, "the quantized checkpoint")
    _export_arguments(parser, "output directory", required=True)
    _card_arguments(parser)


def _export_arguments(parser, path_help: str, required: bool = False) -> None:
    parser.add_argument("--export_path", required=required, help=path_help)
    parser.add_argument("--export_target", default="modelopt", help=f"{', '.join(EXPORT_TARGETS)}")


def _add_push(subparsers) -> None:
    parser = subparsers.add_parser("push", help="push a quantized checkpoint to the Hub in one commit, with its card")
    _model_arguments(parser, "the quantized checkpoint")
    parser.add_argument("repo_id", help="the Hub repo, e.g. me/model-fp8")
    _hub_arguments(parser)
    _card_arguments(parser)


def _add_upgrade(subparsers) -> None:
    parser = subparsers.add_parser("upgrade", help="write the missing quantization_config into an older ModelOpt "
                                   "export's config.json (from its hf_quant_config.json)")
    parser.add_argument("model", metavar="DIR", help="the checkpoint folder (changed in place)")
    parser.set_defaults(model_option=None)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Post-training quantization for Hugging Face models, "
                                     "with ModelOpt-compatible unified checkpoints.")
    parser.add_argument("--debug", action="store_true", help="debug logging, and full tracebacks on errors")
    subcommand_parser = functools.partial(argparse.ArgumentParser, formatter_class=_HelpFormatter)
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="{quantize,eval,export,push,upgrade}",
                                       parser_class=subcommand_parser)
    for add in (_add_quantize, _add_eval, _add_export, _add_push, _add_upgrade):
        add(subparsers)
    return parser


def _fix_model_argument(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if (args.model is None) == (args.model_option is None):
        parser.error("give the model once: as the positional MODEL or as --pyt_ckpt_path/--model")
    args.model = args.model or args.model_option


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _fix_model_argument(parser, args)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    for library in ("huggingface_hub", "transformers"):  # they print with their own handlers: once is enough
        library_logger = logging.getLogger(library)
        library_logger.propagate = library_logger.propagate and not library_logger.handlers
    try:
        COMMANDS[args.command](args)
    except (ValueError, OSError) as error:
        if args.debug:
            raise
        cause = " ".join(str(error).split()) or type(error).__name__
        print(f"{PROG}: error: {cause}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
