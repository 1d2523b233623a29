"""Calibration algorithms as types, and the one table of them.

Strings name algorithms only at the edges (PTQConfig, the CLI, config.json); `get_algorithm`
turns a name into its `Algorithm`, and `Algorithm.fits(fmt)` is the one place that says which
(format, algorithm) pairs are valid.
"""

from typing import List

from ... import formats as F
from .awq import AWQ
from .base import Algorithm, BlockContext
from .gptq import GPTQ
from .max_mse import MSE, Max
from .smoothquant import SmoothQuant

ALGORITHMS = {a.name: a for a in (Max(), SmoothQuant(), AWQ("awq_lite", search=True, clip=False),
                                  AWQ("awq_clip", search=False, clip=True), AWQ("awq_full", search=True, clip=True),
                                  GPTQ(), MSE())}


def get_algorithm(name: str) -> Algorithm:
    """The Algorithm of a name; a ValueError lists the valid names."""
    if name not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {name!r}; valid: {', '.join(ALGORITHMS)}")
    return ALGORITHMS[name]


def algorithms_for(fmt: F.Format) -> List[str]:
    """The names of the algorithms that fit `fmt`."""
    return [name for name, algorithm in ALGORITHMS.items() if algorithm.fits(fmt)]


__all__ = ["ALGORITHMS", "Algorithm", "BlockContext", "algorithms_for", "get_algorithm"]
