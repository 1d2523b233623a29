"""Layers that share one input scale (the experts of a MoE layer), and the tokens each expert saw.

The rule, as ModelOpt HEAD applies it (`docs/modelopt-facts.md` §3.1, §10.1): every expert of a layer
gets the same input amax per projection, the max over the layer's experts. An expert that no
calibration token reached therefore gets the max over the other experts of its layer and
projection; its weight scales come from its weights alone. `pool_shared_inputs` applies the rule to
per-layer statistics (e.g. for `calibrate(model, data)` on a model whose experts are already
QuantExperts); `log_token_counts` reports tokens per expert.
"""

import logging
from collections import defaultdict
from typing import Dict, List

import torch

logger = logging.getLogger(__name__)


def pool_shared_inputs(modules: Dict[str, object], stats: Dict[str, object]) -> None:
    """Give every member of a `shared_input` group the group's per-channel amax (in place).

    A group none of whose members saw a token is left alone (its members stay unseen).
    """
    groups = defaultdict(list)
    for name, module in modules.items():
        tag = getattr(module, "shared_input", None)
        if tag is not None:
            groups[id(tag)].append(name)
    counts = {}
    for names in groups.values():
        seen = [stats[n].channel_amax for n in names if stats[n].channel_amax is not None]
        if not seen:
            continue
        pooled = torch.stack(seen).amax(dim=0)
        for n in names:
            stats[n].channel_amax = pooled
        layer = names[0].rsplit(".", 2)[0]  # "<experts>.{e}.{proj}" -> "<experts>"
        counts.setdefault(layer, {}).update({int(n.rsplit(".", 2)[1]): stats[n].num_tokens for n in names})
    if counts:
        log_token_counts({layer: [c[e] for e in sorted(c)] for layer, c in counts.items()})


def log_token_counts(counts: Dict[str, List[int]]) -> None:
    """Tokens per expert per MoE layer (logger.info), and the no-token rule for experts that got none."""
    width = max(len(layer) for layer in counts)
    lines = [f"{layer:<{width}}  " + " ".join(f"{c:>6d}" for c in row) for layer, row in counts.items()]
    logger.info("calibration tokens per expert (rows: MoE layers, columns: experts 0..):\n%s", "\n".join(lines))
    unseen = {layer: [e for e, c in enumerate(row) if c == 0] for layer, row in counts.items()}
    unseen = {layer: experts for layer, experts in unseen.items() if experts}
    if unseen:
        layer, experts = next(iter(unseen.items()))
        logger.warning("%d expert(s) in %d MoE layer(s) received no calibration token (e.g. %s experts %s); "
                       "their input scales are the max over the other experts of their layer and projection, "
                       "their weight scales come from their weights alone", sum(map(len, unseen.values())),
                       len(unseen), layer, experts)
