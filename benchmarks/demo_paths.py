"""Print what the command-line part of `make demo` needs: three paths, prepared once, and a dtype.

SmolLM2-135M-Instruct as a local checkpoint (`smollm2`), the calibration text
(the five Austen novels other than Pride and Prejudice, written once into one .txt file) and the
evaluation text (Pride and Prejudice), all in --cache-dir; then the compute dtype the demo's table
used (bfloat16 on a CPU with native bf16 instructions, else float32). One line, separated by
spaces, for the shell:

    set -- $(python benchmarks/demo_paths.py); hf-ptq quantize $1 --dataset $2 --dtype $4 ...; hf-ptq eval ... --text $3
"""

import argparse
from pathlib import Path

from austen import EVAL_NOVEL, austen_novels, calibration_and_eval_texts
from demo_perplexity import compute_dtype
from smollm2 import smollm2_checkpoint


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "hf_ptq_plugin")
    args = parser.parse_args()
    model = smollm2_checkpoint(args.cache_dir)
    austen_novels(args.cache_dir)  # extracts the novels once
    calib = args.cache_dir / "austen_calibration.txt"
    if not calib.exists():
        partial = calib.with_suffix(".partial")
        partial.write_text(calibration_and_eval_texts(args.cache_dir)[0], encoding="utf-8")
        partial.rename(calib)  # a complete file or none
    dtype = str(compute_dtype("auto")).removeprefix("torch.")
    print(model, calib, args.cache_dir / "austen" / f"{EVAL_NOVEL}.txt", dtype)


if __name__ == "__main__":
    main()
