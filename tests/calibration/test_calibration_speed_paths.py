"""The faster forms calibration computes in: they must give the numbers of the plain forms.

- AWQ's loss through the Gram matrix x^T x equals the loss on the outputs themselves, and
  awq_clip's per-group Gram matrices choose the clip ratios the partial outputs choose.
- AWQ's search on a group wider than MAX_SEARCH_ROWS scores every n-th row, and on a group whose
  rows share their statistics chooses the scale that all rows choose; SmoothQuant's alpha search
  likewise scores every n-th token and row above its caps.
- A just-quantized bf16 block feeds the next block through bf16 dense weights
  (`bf16_dense_weights`): within bf16 rounding of the kernels' outputs, and back to the kernels after.
- The NaN/Inf check's one-sum fast path still finds every non-finite value.
- GPTQ's Hessian from half the Gram matrix equals x^T x, and its factor is computed in the Hessian's
  own storage; the statistics pass that stops a block once every Linear had its
  input collects what the full run collects.
"""

import logging

import pytest
import torch
from conftest import sqnr_db, tiny_llama

from hf_ptq_plugin import FORMATS, PTQConfig, quantize
from hf_ptq_plugin.backends import cpu_blas
from hf_ptq_plugin.backends.cpu_weights import bf16_dense_weights
from hf_ptq_plugin.calibration import awq, smoothquant
from hf_ptq_plugin.calibration.awq import _quantized_output, _squared_output_error
from hf_ptq_plugin.calibration.blocks import capture_block_inputs, observe_block
from hf_ptq_plugin.calibration.clipping import CLIP_RATIOS, clip_int_scale, clip_weight_scale
from hf_ptq_plugin.calibration.gptq import HessianFactor, HessianStats
from hf_ptq_plugin.calibration.stats import InputStats, finite_values, input_hooks
from hf_ptq_plugin.modules.layer_plan import LayerPlan
from hf_ptq_plugin.modules.quant_linear import QuantLinear
from hf_ptq_plugin.numerics import input_scale_from_amax, quantize_activation
from hf_ptq_plugin.numerics.integer import INT4_MAX, INT8_MAX, int_quantize
from hf_ptq_plugin.numerics.scales import block_amax, scale_from_amax
from hf_ptq_plugin.numerics.weights import fake_quantize_weight


def test_awq_gram_loss_equals_the_output_loss():
    torch.manual_seed(0)
    w, x = torch.randn(96, 256), torch.randn(512, 256) * (torch.rand(256) * 4)
    fmt = FORMATS["int4_awq"]
    x_amax = x.abs().amax(dim=0)
    gram_form = _squared_output_error(w, x, x_amax, fmt, 64, evaluations=11)  # K (tokens + 11 N) < 11 tokens N
    reference = x @ w.T
    for scale in (torch.ones(256), torch.rand(256) + 0.5, torch.rand(256) * 3 + 0.1):
        direct = (_quantized_output(w, x, x_amax, scale, fmt, 64) - reference).pow(2).sum()
        torch.testing.assert_close(gram_form(scale), direct, rtol=1e-4, atol=0)


def test_awq_search_scores_a_wide_group_on_every_nth_row(monkeypatch):
    torch.manual_seed(0)
    monkeypatch.setattr(awq, "MAX_SEARCH_ROWS", 64)
    w, x = torch.randn(200, 128), torch.randn(256, 128) * (torch.rand(128) * 4)
    fmt, x_mean, x_amax = FORMATS["int4_awq"], x.abs().mean(dim=0), x.abs().amax(dim=0)
    w_mean = awq.normalized_weight_mean(w, 64)
    assert awq.search_rows(w).shape[0] == 50  # stride 4 = ceil(200 / 64)
    losses = awq.alpha_losses(w, x, x_mean, x_amax, w_mean, fmt, 64)
    monkeypatch.setattr(awq, "MAX_SEARCH_ROWS", 4096)
    assert torch.equal(losses, awq.alpha_losses(w[::4], x, x_mean, x_amax, w_mean, fmt, 64))


def test_awq_search_on_a_row_subset_chooses_what_all_rows_choose(monkeypatch):
    """Rows drawn alike (one outlier input channel, one weight-heavy channel): the strided subset's
    loss curve has its minimum at the same alpha as the whole group's."""
    torch.manual_seed(0)
    x = torch.randn(512, 256)
    x[:, 7] *= 30
    w = torch.randn(4096, 256) * 0.02
    w[:, 11] *= 10
    fmt, x_mean, x_amax = FORMATS["int4_awq"], x.abs().mean(dim=0), x.abs().amax(dim=0)
    w_mean = awq.normalized_weight_mean(w, 128)
    full = awq.alpha_losses(w, x, x_mean, x_amax, w_mean, fmt, 128)
    monkeypatch.setattr(awq, "MAX_SEARCH_ROWS", 512)
    subset = awq.alpha_losses(w, x, x_mean, x_amax, w_mean, fmt, 128)
    assert int(subset.argmin()) == int(full.argmin()) and 0 < int(full.argmin()) < len(awq.ALPHA_GRID) - 1
    torch.testing.assert_close(subset * 8, full, rtol=0.05, atol=0)


def test_smoothquant_search_scores_every_nth_token_and_row_with_the_scale_of_all_rows(monkeypatch):
    """Above SEARCH_TOKENS / SEARCH_ROWS the loss is the loss on the strided subsets, where the
    smoothing scale still takes each channel's max |w| over every row (the scale the layer gets)."""
    torch.manual_seed(0)
    monkeypatch.setattr(smoothquant, "SEARCH_TOKENS", 100)
    monkeypatch.setattr(smoothquant, "SEARCH_ROWS", 64)
    fmt = FORMATS["int8_sq"]
    w, x = torch.randn(200, 128), torch.randn(300, 128) * (torch.rand(128) * 4)
    w[1, :] *= 5  # a row outside the subset (stride 4) sets every channel's max |w|
    x_amax = x.abs().amax(dim=0)
    errors = smoothquant.alpha_errors(w, x_amax, x, fmt)
    monkeypatch.setattr(smoothquant, "SEARCH_TOKENS", 4096)
    monkeypatch.setattr(smoothquant, "SEARCH_ROWS", 4096)
    expected = smoothquant.alpha_errors(w[::4], x_amax, x[::3], fmt, w_channel_amax=w.abs().amax(dim=0))
    assert torch.equal(errors, expected)
    assert not torch.equal(errors, smoothquant.alpha_errors(w[::4], x_amax, x[::3], fmt))


def test_awq_loss_quantizes_activations_of_formats_that_do():
    """W4A8's loss must see its FP8 activations, which the Gram form cannot: the direct form is kept."""
    torch.manual_seed(0)
    w, x, scale = torch.randn(96, 256), torch.randn(512, 256), torch.rand(256) + 0.5
    fmt = FORMATS["w4a8_awq"]
    x_amax = x.abs().amax(dim=0)
    direct = (_quantized_output(w, x, x_amax, scale, fmt, 64) - x @ w.T).pow(2).sum()
    assert torch.equal(_squared_output_error(w, x, x_amax, fmt, 64, evaluations=11)(scale), direct)


def test_awq_loss_takes_the_static_input_scale_of_all_tokens_not_of_the_sample():
    """The sample is a subset of the tokens: the input scale the model will get comes from the
    per-channel max over all of them (here twice the sample's), divided by the smoothing scale."""
    torch.manual_seed(0)
    w, x, scale = torch.randn(96, 256), torch.randn(512, 256), torch.rand(256) + 0.5
    fmt, x_amax = FORMATS["w4a8_awq"], 2 * x.abs().amax(dim=0)
    input_scale = input_scale_from_amax((x_amax / scale).amax(), fmt)
    # The product through the BLAS the search uses (cpu_blas), so that only the operands can differ.
    expected = cpu_blas.mm(quantize_activation(x / scale, fmt, input_scale), fake_quantize_weight(w * scale, fmt, 64).T)
    assert torch.equal(_quantized_output(w, x, x_amax, scale, fmt, 64), expected)


def bf16_quantized_layer(qformat):
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 192, bias=True, dtype=torch.bfloat16)
    return QuantLinear.from_linear(linear, FORMATS[qformat], plan=LayerPlan(input_amax=torch.tensor(4.0)))


@pytest.mark.parametrize("qformat", ["int4_awq", "fp8", "nvfp4", "w4a8_awq", "int8_wo"])
def test_bf16_dense_weights_match_the_kernels_and_hand_back(qformat):
    module = bf16_quantized_layer(qformat)
    x = torch.randn(300, 256).bfloat16()
    with torch.no_grad():
        kernel = module(x)
        kernel_kind = module.cpu_weight_cache.kind
        with bf16_dense_weights([module]):
            dense = module(x)
            assert module.cpu_weight_cache.kind == "dense"
            assert module.cpu_weight_cache.matrix.dtype == torch.bfloat16
        assert module.cpu_weight_cache is None  # the next call builds the kernel form again
        assert torch.equal(module(x), kernel) and module.cpu_weight_cache.kind == kernel_kind
    assert dense.dtype == torch.bfloat16
    assert sqnr_db(kernel.float(), dense.float()) > 40  # both within bf16 rounding of the reference


def test_bf16_dense_weights_leave_w8a8_on_its_exact_int8_gemm():
    module = bf16_quantized_layer("int8_sq")
    x = torch.randn(300, 256).bfloat16()
    with torch.no_grad():
        kernel = module(x)
        with bf16_dense_weights([module]):
            assert torch.equal(module(x), kernel)
            assert module.cpu_weight_cache.kind == "int8pack"


def test_streamed_bf16_calibration_on_dense_weights_matches_it_on_the_kernels(monkeypatch):
    """The dense weights only speed up the pass that feeds block i's outputs to block i + 1. Their bf16
    rounding moves the next blocks' inputs a little, so AWQ's search may pick a neighbouring alpha
    there: scales a few percent apart, and a model as close to the unquantized one."""
    import contextlib

    import hf_ptq_plugin.calibration.compute_dtype as compute_dtype
    import hf_ptq_plugin.calibration.streamed as streamed

    # bf16 calibration, as on a CPU with native bf16 (without, it computes in fp32: test_compute_dtype.py)
    monkeypatch.setattr(compute_dtype, "cpu_computes_natively", lambda dtype: True)
    torch.manual_seed(2)
    ids = torch.randint(0, 320, (8, 64))
    with torch.no_grad():
        unquantized = tiny_llama(0, layers=3).to(torch.bfloat16)(ids).logits
    layers, accuracy = [], []
    for use_dense in (True, False):
        if not use_dense:
            monkeypatch.setattr(streamed, "bf16_dense_weights", lambda modules: contextlib.nullcontext())
        model = tiny_llama(0, layers=3).to(torch.bfloat16)
        quantize(model, PTQConfig(qformat="int4_awq", algorithm="awq_lite", pre_quant_scales="keep"),
                 forward_loop=lambda m: m(ids))
        layers.append([m for m in model.modules() if isinstance(m, QuantLinear)])
        with torch.no_grad():
            accuracy.append(sqnr_db(unquantized, model(ids).logits))
    assert len(layers[0]) == 21
    for dense, kernel in zip(*layers):
        if kernel.pre_quant_scale is not None:
            torch.testing.assert_close(dense.pre_quant_scale, kernel.pre_quant_scale, rtol=0.05, atol=0)
    assert abs(accuracy[0] - accuracy[1]) < 0.5


def test_finite_check_fast_path_keeps_finite_values_whose_sum_overflows(caplog):
    x = torch.full((4, 8), 3e38)
    with caplog.at_level(logging.WARNING):
        assert finite_values(x, "layer", set()) is x
    assert not caplog.records


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_finite_check_still_zeroes_every_non_finite_value(bad, caplog):
    x = torch.randn(4, 8).bfloat16()
    x[1, 3], x[2, 5] = bad, bad
    with caplog.at_level(logging.WARNING):
        cleaned = finite_values(x, "layer", set())
    assert cleaned[1, 3] == 0 and cleaned[2, 5] == 0 and torch.isfinite(cleaned).all()
    assert "2 of 32" in caplog.text


def test_calibrating_on_activations_with_no_finite_value_is_an_error():
    loop = lambda model: model(inputs_embeds=torch.full((1, 8, 128), float("nan")))  # noqa: E731
    with pytest.raises(ValueError, match=r"model.layers.0.self_attn.q_proj: every one of 1024 calibration "
                                         r"activation values is NaN or Inf"):
        quantize(tiny_llama(), PTQConfig(qformat="fp8"), loop)


def test_gptq_takes_a_hessian_from_its_statistics_and_copies_one_given_as_a_tensor_unless_in_place():
    torch.manual_seed(0)
    stats = HessianStats()
    stats.update(torch.randn(256, 64))
    given = stats.hessian.clone()
    HessianFactor(given)
    assert torch.equal(given, stats.hessian)  # untouched
    assert HessianFactor(given, in_place=True).factor.data_ptr() == given.data_ptr()  # a matrix made for the call
    finished = stats.hessian
    factor = HessianFactor(stats)
    assert stats.take_hessian() is None  # handed over: the factor is computed in its storage
    assert factor.factor.data_ptr() == finished.data_ptr()
    with pytest.raises(RuntimeError, match="update after its hessian was read"):
        stats.update(torch.randn(4, 64))


def test_gptq_on_a_hessian_that_is_not_positive_definite_names_the_fix():
    hessian = torch.diag(torch.tensor([4.0, 1.0, -3.0, 2.0]))
    with pytest.raises(torch.linalg.LinAlgError, match="not positive-definite.*raise perc_damp"):
        HessianFactor(hessian, act_order=False)


def test_statistics_pass_stops_after_the_last_observed_input_with_the_same_statistics():
    torch.manual_seed(2)
    model = tiny_llama(0)
    ids = torch.randint(0, 320, (6, 32))
    blocks = model.model.layers
    inputs = capture_block_inputs(model, blocks, lambda m: [m(b) for b in ids.split(2)])
    block = blocks[0]
    linears = {n: m for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
    down_calls = []
    block.mlp.down_proj.register_forward_hook(lambda *args: down_calls.append(1))
    collected = []
    for stop_after in (linears.values(), ()):
        stats = {name: InputStats(sample_stride=1) for name in linears}
        with input_hooks(linears, stats):
            observe_block(block, inputs, stop_after)
        collected.append(stats)
    assert len(down_calls) == 3  # only the run to the end computed down_proj (3 batches)
    for name in linears:
        early, full = collected[0][name], collected[1][name]
        assert early.num_tokens == full.num_tokens == 6 * 32
        assert torch.equal(early.channel_amax, full.channel_amax) and torch.equal(early.sample, full.sample)


def test_int4_clip_through_group_gram_matrices_picks_what_the_partial_outputs_pick():
    """awq_clip scores each (row, group) block by sum_t (x_t,g . (w - Q(w))_g)^2; the Gram form
    must choose the same clip ratio per block as computing those partial outputs."""
    torch.manual_seed(0)
    w, x = torch.randn(96, 256) * 0.02, torch.randn(400, 256) * (torch.rand(256) * 3)
    amax = block_amax(w, 64)
    errors = []
    for ratio in CLIP_RATIOS:
        step = scale_from_amax(amax * ratio, INT4_MAX).repeat_interleave(64, dim=1)
        diff = (w - int_quantize(w, step, 4).float() * step).view(96, 4, 64)
        errors.append(torch.einsum("tgk,ngk->tng", x.view(400, 4, 64), diff).pow(2).sum(dim=0))
    best = torch.tensor(CLIP_RATIOS)[torch.stack(errors).argmin(dim=0)]
    assert (best < 1.0).any()  # some blocks clip: the comparison is not vacuous
    assert torch.equal(clip_int_scale(w, x, 64), scale_from_amax(amax * best, INT4_MAX))


def test_int8_clip_picks_per_row_the_ratio_with_the_least_output_error():
    """INT8 (int8_sq under awq_clip) clips whole rows: the row's output error sum_t (x_t . d)^2."""
    torch.manual_seed(0)
    w, x = torch.randn(96, 256) * 0.02, torch.randn(400, 256) * (torch.rand(256) * 3)
    w[:, :3] *= 30  # a few large columns, so that clipping them can pay
    amax = w.abs().amax(dim=1, keepdim=True)
    errors = []
    for ratio in CLIP_RATIOS:
        step = scale_from_amax(amax * ratio, INT8_MAX)
        errors.append((x @ (w - int_quantize(w, step, 8).float() * step).T).pow(2).sum(dim=0))  # (N,)
    best = torch.tensor(CLIP_RATIOS)[torch.stack(errors).argmin(dim=0)]
    assert (best < 1.0).any() and (best == 1.0).any()  # rows differ: the comparison is not vacuous
    scale = clip_weight_scale(w, x, FORMATS["int8_sq"], None)
    assert scale.shape == (96,)
    torch.testing.assert_close(scale, scale_from_amax(amax[:, 0] * best, INT8_MAX), rtol=0, atol=0)
