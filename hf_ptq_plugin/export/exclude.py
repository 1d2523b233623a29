"""exclude_modules as prefix wildcards, the way ModelOpt summarizes them (`docs/modelopt-facts.md` §6.2).

For each Linear left in full precision, walk its dotted name from the left and emit the shortest
`prefix*` that catches no quantized layer (or `prefix.*` when `prefix*` would catch a quantized
sibling such as `mlp` vs `mlp_proj`); fall back to the exact name. So a whole vision tower becomes
`model.visual*` while a per-layer router stays `model.layers.0.mlp.gate`. Engines read the entries
as fnmatch patterns.
"""

import bisect
from typing import Iterable, List


def summarize_exclude_modules(unquantized: Iterable[str], quantized: Iterable[str]) -> List[str]:
    """Sorted, de-duplicated wildcard list covering `unquantized` and matching none of `quantized`."""
    quantized = sorted(quantized)
    return sorted({_shortest_pattern(name, quantized) for name in unquantized})


def _shortest_pattern(name: str, quantized: List[str]) -> str:
    for i, char in enumerate(name):
        if char != ".":
            continue
        prefix = name[:i]
        if not _any_starts_with(quantized, prefix):
            return prefix + "*"
        if not _any_starts_with(quantized, prefix + "."):
            return prefix + ".*"
    return name


def _any_starts_with(sorted_names: List[str], prefix: str) -> bool:
    # Names sharing a prefix are contiguous in sorted order and the first one sorts at or after
    # `prefix`, so one binary search answers it (models have up to ~10^5 quantized experts).
    i = bisect.bisect_left(sorted_names, prefix)
    return i < len(sorted_names) and sorted_names[i].startswith(prefix)
