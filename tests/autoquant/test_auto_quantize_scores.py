"""Sensitivity scores against a direct computation, and their ranking of a deliberately worse candidate."""

import copy

import pytest
import torch
import torch.nn.functional as F_nn
from autoquant_data import token_batch
from conftest import tiny_llama

from hf_ptq_plugin import get_format
from hf_ptq_plugin.autoquant.groups import LayerGroup, search_groups
from hf_ptq_plugin.autoquant.scores import SAMPLING_SEED, causal_lm_loss, gradient_scores, kl_div_scores, sampled_labels
from hf_ptq_plugin.modules.quant_linear import QuantLinear, reference_forward

GATE_UP = ("model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj")
O_PROJ = ("model.layers.1.self_attn.o_proj",)


def fp8_candidates(model, members, noise: float = 0.0):
    """fp8 QuantLinears of `members`; with `noise`, of weights perturbed by it (a deliberately worse candidate)."""
    torch.manual_seed(7)
    layers = {}
    for name in members:
        linear = copy.deepcopy(model.get_submodule(name))
        with torch.no_grad():
            linear.weight.add_(noise * torch.randn_like(linear.weight))
        layers[name] = QuantLinear.from_linear(linear, get_format("fp8"))
    return layers


def group_of(model, members):
    return LayerGroup(",".join(members), members, sum(model.get_submodule(m).weight.numel() for m in members))


def no_grad_loop(batch):
    def loop(model):
        with torch.no_grad():  # as calibration loops run: scoring must turn gradients on itself
            model(**batch)
    return loop


def data_labels(logits, batch):
    return batch["input_ids"][:, 1:]


def model_sampled_labels(logits, batch):
    """What the default loss draws: the model's own next tokens, from a generator seeded as it seeds its own."""
    return sampled_labels(logits, torch.Generator().manual_seed(SAMPLING_SEED))


def direct_gradient_score(model, members, batch, candidate_layers, labels_of=data_labels) -> float:
    """sum((dL/dY * (Y_c - Y))^2) with plain autograd (parameters requiring grad, as the model comes),
    the loss a cross-entropy against `labels_of(logits, batch)`."""
    seen = {}

    def keep(name):
        def hook(module, args, output):
            output.retain_grad()
            seen[name] = (args[0].detach(), output)
        return hook

    handles = [model.get_submodule(m).register_forward_hook(keep(m)) for m in members]
    logits = model(**batch).logits[:, :-1]
    labels = labels_of(logits, batch).clone()
    labels[batch["attention_mask"][:, 1:] == 0] = -100
    F_nn.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100).backward()
    for handle in handles:
        handle.remove()
    with torch.no_grad():
        return sum(((y.grad * (candidate_layers[m](x) - y.detach())) ** 2).sum().item() for m, (x, y) in seen.items())


@pytest.mark.parametrize("loss_fn, labels_of", [(None, model_sampled_labels), (causal_lm_loss, data_labels)],
                         ids=["default-sampled-labels", "modelopt-data-labels"])
def test_gradient_score_matches_autograd_and_ranks_a_worse_candidate_higher(loss_fn, labels_of):
    model, batch = tiny_llama(), token_batch()
    candidates = {"fp8": fp8_candidates(model, GATE_UP), "noisy": fp8_candidates(model, GATE_UP, noise=0.05)}
    group = [group_of(model, GATE_UP)]
    scores = gradient_scores(model, group, candidates, no_grad_loop(batch), loss_fn)[",".join(GATE_UP)]
    assert all(p.grad is None and p.requires_grad for p in model.parameters())  # no weight gradient, restored
    assert scores["noisy"] > 10 * scores["fp8"] > 0
    for label, layers in candidates.items():
        expected = direct_gradient_score(model, GATE_UP, batch, layers, labels_of)
        assert scores[label] == pytest.approx(expected, rel=1e-5)
    again = gradient_scores(model, group, candidates, no_grad_loop(batch), loss_fn)[",".join(GATE_UP)]
    assert again == scores  # the sampled labels are seeded: a search is repeatable


def test_sampled_labels_follow_the_models_distribution():
    logits = torch.tensor([[2.0, 0.0, -1.0, 1.0]]).expand(20000, 4)
    labels = sampled_labels(logits, torch.Generator().manual_seed(1))
    frequencies = torch.bincount(labels, minlength=4).float() / labels.numel()
    assert labels.shape == (20000,)
    torch.testing.assert_close(frequencies, torch.softmax(logits[0], dim=0), atol=0.01, rtol=0)


def direct_kl(model, members, layers, batch) -> float:
    """Sum over real tokens of KL(p_full || p_quantized), the group's layers swapped in by hand and run as the
    scores run candidates: on the reference."""
    with torch.no_grad():
        log_p = F_nn.log_softmax(model(**batch).logits.float(), dim=-1)
        originals = {m: model.get_submodule(m) for m in members}
        for m in members:
            model.set_submodule(m, layers[m])
        with reference_forward(model):
            log_q = F_nn.log_softmax(model(**batch).logits.float(), dim=-1)
        for m, module in originals.items():
            model.set_submodule(m, module)
    kl = F_nn.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)  # (B, S)
    return kl[batch["attention_mask"].bool()].sum().item()


def test_kl_div_score_matches_a_direct_computation_per_group():
    model, batch = tiny_llama(), token_batch()
    groups = [group_of(model, GATE_UP), group_of(model, O_PROJ)]
    members = GATE_UP + O_PROJ
    candidates = {"fp8": fp8_candidates(model, members), "noisy": fp8_candidates(model, members, noise=0.05)}
    scores = kl_div_scores(model, groups, candidates, no_grad_loop(batch))
    for group in groups:
        for label, layers in candidates.items():
            expected = direct_kl(model, group.members, layers, batch)
            assert scores[group.name][label] == pytest.approx(expected, rel=1e-4)
        assert scores[group.name]["noisy"] > 10 * scores[group.name]["fp8"] > 0


def test_groups_follow_the_fused_siblings_and_leave_the_lm_head_out():
    groups, linears = search_groups(tiny_llama(layers=1))
    assert [g.members for g in groups] == [
        ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj"),
        ("model.layers.0.self_attn.o_proj",), GATE_UP, ("model.layers.0.mlp.down_proj",)]
    assert groups[0].name == "model.layers.0.self_attn.{q_proj,k_proj,v_proj}"
    assert groups[0].elements == sum(linears[m].weight.numel() for m in groups[0].members)
    assert "lm_head" not in linears
