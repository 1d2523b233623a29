"""How much each candidate format would hurt each layer group, measured on scoring batches.

- `gradient` (ModelOpt's method): the full-precision model runs forward and backward on a loss; at
  every searched layer (a Linear, or a MoE layer's experts on the same routed tokens), with Y its
  output, Y_c a candidate's output on the same inputs and g = dL/dY, the score adds
  sum((g * (Y_c - Y))^2), a second-order estimate of how far the candidate moves the model. Only
  activation gradients flow: no parameter requires grad, the embedding output does.
  The loss: ModelOpt takes the LM loss on the data's own next tokens (`causal_lm_loss`), whose
  squared gradients are the *empirical* Fisher. Ours by default takes each next token sampled from
  the full-precision model's own prediction (`sampled_label_loss`): its squared gradients estimate
  the true Fisher, the curvature of KL(p_full || p_quantized), which is what a candidate's damage
  to the model's predictions costs. On the SmolLM2 protocol it chooses better mixes at the same
  budget (BENCHMARKS.md, "AutoQuantize"). The samples come from a seeded generator, so a search
  is repeatable.
- `kl_div`: for each group and candidate, with only that group quantized, the score adds
  KL(p_full || p_quantized) of the next-token distributions over the real (unpadded) tokens.

The scoring loop is any forward loop (`loop(model)`): scoring replaces the model's top-level
forward while it runs, so each batch the loop passes is scored as the loop passes it. Candidates
compute with the reference numerics (`reference_forward`): they dequantize per call, so no
candidate keeps a CPU kernel's derived weight (a dense copy) beyond the layer it runs, and that is
also faster than building such a form for the few calls scoring makes.
"""

import contextlib
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F_nn
from torch import nn

from ..modules.quant_linear import QuantLinear, reference_forward
from .groups import LayerGroup

Candidates = Dict[str, Dict[str, QuantLinear]]  # {qformat: {layer name: QuantLinear}}
Scores = Dict[str, Dict[str, float]]  # {group name: {qformat: score}}
SAMPLING_SEED = 0  # of the gradient score's sampled labels: the same search gives the same scores


def gradient_scores(model: nn.Module, groups: List[LayerGroup], candidates: Candidates, score_loop: Callable,
                    loss_fn: Optional[Callable] = None) -> Scores:
    """Sum over scoring tokens of (dL/dY * (Y_c - Y))^2 per group and candidate format.

    loss_fn(outputs, batch) -> scalar; default `sampled_label_loss` (module docstring)."""
    loss_fn = loss_fn or sampled_label_loss()
    scores = {group.name: dict.fromkeys(candidates, 0.0) for group in groups}
    group_of = {member: group.name for group in groups for member in group.members}

    def observe(name: str):
        def hook(module, args, kwargs, output):
            if output.requires_grad:  # the inputs (a Linear's x; the experts' tokens, routing) replay on candidates
                inputs, y = (_detached(args), _detached(kwargs)), output.detach()
                output.register_hook(
                    lambda g: _add_gradient_scores(scores[group_of[name]], candidates, name, inputs, y, g))
        return hook

    def forward_backward(forward, args, kwargs):
        with torch.enable_grad():
            outputs = forward(*args, **kwargs)
            loss = loss_fn(outputs, _batch(args, kwargs))
        loss.backward()
        return outputs

    layers = {m: model.get_submodule(m) for m in group_of}
    with _frozen_parameters(model), _embedding_output_requires_grad(model), _hooks(layers, observe), \
            _reference_candidates(candidates), _scoring_forward(model, forward_backward):
        score_loop(model)
    return scores


@torch.no_grad()
def _add_gradient_scores(group_scores: Dict[str, float], candidates: Candidates, name: str, inputs: tuple,
                         y: torch.Tensor, g: torch.Tensor) -> None:
    g, (args, kwargs) = g.float(), inputs
    for qformat, layers in candidates.items():
        if name in layers:  # a format that cannot store the layer has no candidate for it
            y_c = layers[name](*args, **kwargs)
            group_scores[qformat] += (g * (y_c.float() - y.float())).square().sum().item()


def kl_div_scores(model: nn.Module, groups: List[LayerGroup], candidates: Candidates,
                  score_loop: Callable) -> Scores:
    """Sum over real tokens of KL(p_full || p_quantized) per group and candidate, one group quantized at a time."""
    scores = {group.name: dict.fromkeys(candidates, 0.0) for group in groups}

    @torch.no_grad()
    def forward_with_kl(forward, args, kwargs):
        reference = forward(*args, **kwargs)
        log_p = F_nn.log_softmax(_logits(reference).float(), dim=-1)  # (B, S, V)
        p = log_p.exp()
        real = _real_tokens(_batch(args, kwargs), log_p.shape[:-1], log_p.device)
        for group in groups:
            for qformat, layers in candidates.items():
                if not all(m in layers for m in group.members):
                    continue  # the format cannot store the whole group
                with _swapped(model, {m: layers[m] for m in group.members}):
                    log_q = F_nn.log_softmax(_logits(forward(*args, **kwargs)).float(), dim=-1)
                kl = (p * (log_p - log_q)).sum(-1)  # (B, S)
                scores[group.name][qformat] += kl[real].sum().item()
        return reference

    with _reference_candidates(candidates), _scoring_forward(model, forward_with_kl):
        score_loop(model)
    return scores


def causal_lm_loss(outputs, batch: dict) -> torch.Tensor:
    """Mean next-token cross-entropy with labels = input ids, padding (attention_mask 0) left out:
    ModelOpt's scoring loss (the empirical Fisher)."""
    logits = _logits(outputs)[:, :-1].float()  # (B, S-1, V)
    labels = batch["input_ids"][:, 1:].to(logits.device)
    return _cross_entropy(logits, labels, batch)


def sampled_label_loss(seed: int = SAMPLING_SEED) -> Callable:
    """A loss(outputs, batch): mean cross-entropy against next tokens drawn from the model's own
    prediction at each position, padding left out: the true Fisher. The draws are seeded: one
    generator per device, created on first use."""
    generators: Dict[torch.device, torch.Generator] = {}

    def loss(outputs, batch: dict) -> torch.Tensor:
        logits = _logits(outputs)[:, :-1].float()  # (B, S-1, V)
        if logits.device not in generators:
            generators[logits.device] = torch.Generator(logits.device).manual_seed(seed)
        return _cross_entropy(logits, sampled_labels(logits, generators[logits.device]), batch)
    return loss


@torch.no_grad()
def sampled_labels(logits: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One token per position, (..., V) -> (...), drawn from softmax(logits) by `generator`."""
    probs = torch.softmax(logits.detach().float().flatten(0, -2), dim=-1)
    return torch.multinomial(probs, 1, generator=generator).view(logits.shape[:-1])


def _cross_entropy(logits: torch.Tensor, labels: torch.Tensor, batch: dict) -> torch.Tensor:
    """Mean cross-entropy of next-token logits (B, S-1, V) against labels (B, S-1), padded positions left out."""
    labels = labels.clone()
    mask = batch.get("attention_mask")
    if mask is not None:
        labels[mask[:, 1:].to(labels.device) == 0] = -100
    return F_nn.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)


def _detached(values):
    """Tensors of a hook's args (tuple) or kwargs (dict) detached, the rest as is."""
    def detach(value):
        return value.detach() if isinstance(value, torch.Tensor) else value

    if isinstance(values, dict):
        return {k: detach(v) for k, v in values.items()}
    return tuple(detach(v) for v in values)


def _logits(outputs) -> torch.Tensor:
    return outputs.logits if hasattr(outputs, "logits") else outputs[0]


def _batch(args: tuple, kwargs: dict) -> dict:
    """The model's inputs as a dict, `input_ids` included when the loop passed them positionally."""
    batch = dict(kwargs)
    if args and "input_ids" not in batch:
        batch["input_ids"] = args[0]
    return batch


def _real_tokens(batch: dict, shape: torch.Size, device) -> torch.Tensor:
    mask = batch.get("attention_mask")
    if mask is None or tuple(mask.shape) != tuple(shape):
        return torch.ones(shape, dtype=torch.bool, device=device)
    return mask.to(device).bool()


@contextlib.contextmanager
def _swapped(model: nn.Module, layers: Dict[str, nn.Module]):
    """Inside the block the model holds `layers` in place of its own modules of those names."""
    originals = {name: model.get_submodule(name) for name in layers}
    try:
        for name, module in layers.items():
            model.set_submodule(name, module)
        yield
    finally:
        for name, module in originals.items():
            model.set_submodule(name, module)


@contextlib.contextmanager
def _scoring_forward(model: nn.Module, scoring: Callable):
    """Inside the block, `model(...)` runs `scoring(original_forward, args, kwargs)` instead."""
    previous = model.__dict__.get("forward")
    original = model.forward
    model.forward = lambda *args, **kwargs: scoring(original, args, kwargs)
    try:
        yield
    finally:
        if previous is None:
            del model.forward
        else:
            model.forward = previous


def _reference_candidates(candidates: Candidates):
    """Inside the block every candidate runs the reference numerics."""
    return reference_forward(nn.ModuleList([m for layers in candidates.values() for m in layers.values()]))


@contextlib.contextmanager
def _frozen_parameters(model: nn.Module):
    """No parameter requires grad inside the block (no weight gradient is ever computed or stored)."""
    saved = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in saved:
            p.requires_grad_(False)
        yield
    finally:
        for p, requires_grad in saved:
            p.requires_grad_(requires_grad)


@contextlib.contextmanager
def _embedding_output_requires_grad(model: nn.Module):
    """The input embeddings' output requires grad, so activation gradients reach every layer."""
    get_embeddings = getattr(model, "get_input_embeddings", None)
    embeddings = get_embeddings() if get_embeddings is not None else None
    if embeddings is None:
        raise ValueError(f"method='gradient' needs the model's input embeddings (get_input_embeddings()); "
                         f"{type(model).__name__} has none: use method='kl_div'")
    handle = embeddings.register_forward_hook(lambda module, args, output: output.detach().requires_grad_(True))
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def _hooks(modules: Dict[str, nn.Module], make_hook: Callable):
    handles = [module.register_forward_hook(make_hook(name), with_kwargs=True) for name, module in modules.items()]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
