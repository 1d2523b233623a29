"""Shape rules: the group size a model can use, and layers whose shape a format cannot store.

INT4 at the default group size (128) does not divide every model: SmolLM2-135M's hidden size is
576. Our rule, so that checkpoints stay loadable by the engines: when the user leaves
`group_size=None`, use the largest engine-supported INT4 group size (128, then 64) that divides
the input size of every quantized layer, and log the choice; one group size for the whole model,
recorded in the checkpoint's `group_size`. When the user asks for a size that some layer does
not divide, or no supported size fits, fail before touching the model, naming the layer and
the sizes that would work. Never zero-pad partial groups (ModelOpt refuses to export them, and
an engine reading a padded layout would load wrong values).
"""

import logging
from typing import Dict, Optional

from torch import nn

from .. import formats as F

logger = logging.getLogger(__name__)


def resolve_group_size(fmt: F.Format, linears: Dict[str, nn.Linear], requested: Optional[int]) -> Optional[int]:
    """The group size to use for every layer, or a ValueError naming the first layer that breaks it."""
    if not fmt.group_size_choices:
        return fmt.group_size
    in_sizes = {name: module.in_features for name, module in linears.items()}
    fitting = fitting_group_sizes(fmt, linears)
    if requested is not None:
        bad = next((n for n, k in in_sizes.items() if k % requested), None)
        if bad is not None:
            raise ValueError(f"group_size={requested} does not divide in_features={in_sizes[bad]} of layer {bad!r} "
                             f"({fmt.name}); group sizes that fit every layer: {_listing(fitting)}")
        return requested
    if not fitting:
        # Name a layer that no supported size divides (else one that breaks the largest size).
        bad = next((n for n, k in in_sizes.items() if all(k % g for g in fmt.group_size_choices)), None)
        bad = bad or next(n for n, k in in_sizes.items() if k % fmt.group_size_choices[0])
        raise ValueError(f"no supported {fmt.name} group size {fmt.group_size_choices} divides in_features="
                         f"{in_sizes[bad]} of layer {bad!r}; exclude it with exclude_modules=[{bad!r}]")
    if fitting[0] != fmt.group_size:
        logger.warning("%s: group size %d does not divide every layer's input size; using group size %d",
                       fmt.name, fmt.group_size, fitting[0])
    return fitting[0]


def fitting_group_sizes(fmt: F.Format, linears: Dict[str, nn.Linear]) -> list:
    """The format's supported group sizes (largest first) that divide every layer's in_features."""
    return [g for g in fmt.group_size_choices if all(m.in_features % g == 0 for m in linears.values())]


def check_layer_shapes(fmt: F.Format, linears: Dict[str, nn.Linear], group_size: Optional[int]) -> None:
    """ValueError naming the first layer whose shape the format cannot store."""
    for name, problem in unstorable_layers(fmt, linears, group_size).items():
        raise ValueError(f"qformat {fmt.name!r} cannot store layer {name!r}: {problem}; "
                         f"exclude it with exclude_modules=[{name!r}] or pick another qformat")


def unstorable_layers(fmt: F.Format, linears: Dict[str, nn.Linear], group_size: Optional[int]) -> Dict[str, str]:
    """{name: why} of the layers whose shape the format cannot store (at that group size)."""
    problems = {}
    for name, module in linears.items():
        n, k = module.out_features, module.in_features
        if fmt.weight == F.INT4 and n % 2:
            problems[name] = f"out_features={n} is odd (INT4 packs two output rows per byte)"
        elif fmt.weight_granularity in (F.PER_GROUP, F.PER_TILE) and k % group_size:
            problems[name] = f"in_features={k} is not a multiple of the block size {group_size}"
        elif fmt.weight_granularity == F.PER_TILE and n % group_size:
            problems[name] = f"out_features={n} is not a multiple of the tile size {group_size}"
    return problems


def _listing(sizes) -> str:
    return ", ".join(map(str, sizes)) if sizes else "none"
