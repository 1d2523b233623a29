"""The table of defaults (`accuracy.py --defaults`): each format as `PTQConfig(qformat=...)` gives it,
beside ModelOpt's default for that format, and its copy in the README between the markers below.

ModelOpt's perplexities were measured with ModelOpt itself on the same protocol (BENCHMARKS.md,
accuracy table, "other tools" column); where ModelOpt was not run, the column says so.
"""

from pathlib import Path
from typing import List, Sequence, Tuple

from hf_ptq_plugin import formats as F
from hf_ptq_plugin.export.readme_sections import marked_section, replace_marked_section

README_START = "<!-- defaults-table:start (generated: python benchmarks/accuracy.py --defaults --readme README.md) -->"
README_END = "<!-- defaults-table:end -->"

# qformat -> (ModelOpt's default calibration for it, ModelOpt's perplexity on the protocol or None if not run)
MODELOPT_DEFAULTS = {
    "fp8": ("max", 30.63), "fp8_pc_pt": ("max", None), "fp8_pb_wo": ("max", None),
    "int8_sq": ("smoothquant", 31.31), "int8_wo": ("max", None), "int4_awq": ("awq_lite", 36.34),
    "w4a8_awq": ("awq_lite", 37.47), "nvfp4": ("max", 43.54), "nvfp4_awq": ("awq_lite", None),
    "w4a16_nvfp4": ("max", None), "mxfp8": ("max", None),
}

HEADER = ["qformat", "default algorithm", "sequential", "perplexity", "ratio to unquantized", "calibration s",
          "ModelOpt's default", "ModelOpt's perplexity"]


def defaults_rows(results: List[dict], baseline: float) -> Tuple[List[str], List[List[str]]]:
    """(header, rows) of the defaults table from `accuracy.one_run` results of runs named by a qformat."""
    rows = []
    for r in results:
        if r["run"] not in MODELOPT_DEFAULTS:
            continue  # the unquantized baseline
        modelopt_algorithm, modelopt_ppl = MODELOPT_DEFAULTS[r["run"]]
        modelopt = [modelopt_algorithm, f"{modelopt_ppl:.2f}" if modelopt_ppl else "not run"]
        if "error" in r:  # the format cannot store this model (e.g. blocks that do not divide its layers)
            fmt = F.get_format(r["run"])
            rows.append([f"`{r['run']}`", fmt.default_algorithm, "yes" if fmt.default_sequential else "no",
                         "cannot store the model", "-", "-", *modelopt])
            continue
        rows.append([f"`{r['run']}`", r["algorithm"], "yes" if r["sequential"] else "no", f"{r['ppl']:.2f}",
                     f"{r['ppl'] / baseline:.3f}", f"{r['calib_s']:.0f}", *modelopt])
    return HEADER, rows


def markdown(header: Sequence[str], rows: List[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows]) + "\n"


def readme_section(text: str) -> str:
    """What README text holds between the markers; a ValueError if they are missing."""
    return marked_section(text, README_START, README_END)


def update_readme(path: Path, header: Sequence[str], rows: List[Sequence[str]]) -> None:
    """Rewrite the table between the markers of the README at `path`: `rows` replace the rows of their
    formats, the other formats' rows stay (a run of some formats updates only theirs)."""
    kept = {line.split("|")[1].strip(): [c.strip() for c in line.strip().strip("|").split("|")]
            for line in readme_section(Path(path).read_text(encoding="utf-8")).splitlines() if line.startswith("| `")}
    merged = {**kept, **{row[0]: list(row) for row in rows}}
    rows = [merged[f"`{q}`"] for q in MODELOPT_DEFAULTS if f"`{q}`" in merged]
    replace_marked_section(path, README_START, README_END, markdown(header, rows))
