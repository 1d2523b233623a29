"""Printing a benchmark's result rows: a Markdown table (for BENCHMARKS.md) or aligned columns."""

from typing import List, Sequence


def print_table(header: Sequence[str], rows: List[Sequence[str]], markdown: bool, width: int = 18) -> None:
    if markdown:
        print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
        print("\n".join("| " + " | ".join(row) + " |" for row in rows))
    else:
        print("\n".join("  ".join(cell.rjust(width) for cell in row) for row in [header, *rows]))
