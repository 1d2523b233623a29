"""QuantLinear's CPU backend against the reference, its weight cache, and the backend switch.

Per output element, with S = sum_k |x_q[m, k] w[n, k]| + |bias| and both sides rounding the output to
the activation dtype once (bf16: two half-ulps, 2**-7 |reference|; fp16: 2**-10; fp32: 2**-23):
  fp16pack, fp16-exact matrix (FP8, NVFP4, W4A8, MXFP8): only fp32 accumulation order differs,
      <= K * 2**-24 * S (gamma_K).
  fp16pack, rounded matrix (fp8_pb_wo; INT4 torch cannot pack): + 2**-11 * S (fp16's relative
      rounding) + 2**-25 * sum_k |x_q| (half of fp16's subnormal spacing, for tiny weights).
  int4pack: bf16 group scales (2**-9 per weight) and the kernel's own bf16 output (2**-9 of
      |y| <= S): <= 2**-8 * S, doubled for margin.
  int8pack: the kernel's bf16 output before the fp32 scales: <= 2**-9 * S, doubled for margin (W8A16; W8A8's
      int32 sums are exact, on torch._int_mm or, on the AVX2 build of the native kernels, native.w8a8).
  native: fp32 sums of exact products (INT4, fp8_pb_wo: code x scale rounded in fp32), <= (K + 1) * 2**-24 * S.
fp32 and fp16 activations take the same native kernels (and W8A8's exact int8 GEMM), with no fp32 copy of
the weight; without the native kernels they run the reference's own F.linear on a cached fp32 weight.
"""

import copy
import subprocess
import sys

import pytest
import torch
from conftest import sqnr_db, tiny_llama
from torch import nn

from hf_ptq_plugin import FORMATS, PTQConfig, QuantLinear, get_format, quantize
from hf_ptq_plugin.backends import cpu_weights, native
from hf_ptq_plugin.backends.cpu_activations import fast_quantize_activation
from hf_ptq_plugin.modules.layer_plan import LayerPlan
from hf_ptq_plugin.modules.quant_linear import reference_forward
from hf_ptq_plugin.numerics import quantize_activation

N, K = 96, 384  # K: INT4 group 128 x 3, NVFP4 16 x 24, MXFP8 32 x 12; N % 16 == 0 for torch's int4 kernel
PB_SHAPE = (256, 384)  # fp8_pb_wo: 128 x 128 tiles
native_w8a8 = native.w8a8  # the kernel itself, which a test wraps to see it called

NATIVE_FORMATS = ("fp8", "fp8_pc_pt", "fp8_pb_wo", "int8_wo", "int4_awq", "w4a8_awq", "nvfp4", "nvfp4_awq",
                  "w4a16_nvfp4", "mxfp8")
BF16_KINDS = {"int4_awq": "int4pack", "int8_wo": "int8pack", "int8_sq": "int8pack"}
FP32_KINDS = {"int8_sq": "int8pack"}  # other formats run `dense` without the native kernels
if native.library() is not None:
    BF16_KINDS |= {name: "native" for name in NATIVE_FORMATS}
    FP32_KINDS |= {name: "native" for name in NATIVE_FORMATS}


def make_module(name, dtype, seed=0, n=N, k=K):
    torch.manual_seed(seed)
    linear = nn.Linear(k, n).to(dtype)
    linear.weight.data.normal_(0, 0.05)
    fmt = get_format(name)
    pqs = (torch.rand(k) + 0.5).to(dtype) if fmt.pre_quant_scale else None
    return QuantLinear.from_linear(linear, fmt, plan=LayerPlan(input_amax=torch.tensor(2.5), pre_quant_scale=pqs))


def quantized_input_and_magnitude(module, x):
    """(x_q, S): the reference's quantized activations and S of the module docstring."""
    x_in = x if module.pre_quant_scale is None else x * module.pre_quant_scale
    x_q = quantize_activation(x_in, module.fmt, module._activation_scale(x_in))
    return x_q, x_q.abs() @ module.dequantized_weight().abs().t() + module.bias.float().abs()


def bf16_bound(module, x, ref, kind):
    x_q, s = quantized_input_and_magnitude(module, x)
    rel = {"int4pack": 2.0**-7, "int8pack": 2.0**-8}.get(kind, (x.shape[-1] + 1) * 2.0**-24)
    extra = 0.0
    if kind == "fp16pack" and module.fmt.name in ("fp8_pb_wo", "int4_awq"):  # the fp16-rounded matrices
        extra = 2.0**-25 * x_q.abs().sum(-1, keepdim=True)
        rel += 2.0**-11
    return rel * s + extra + 2.0**-7 * ref.float().abs()


@pytest.mark.parametrize("m", [1, 17])  # the native kernels' matrix-vector loop, and torch's GEMM on decoded chunks
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("name", list(FORMATS))
def test_fp32_and_fp16_activations_match_the_reference_within_the_bound(name, dtype, m):
    n, k = PB_SHAPE if name == "fp8_pb_wo" else (N, K)
    module = make_module(name, dtype, n=n, k=k)
    torch.manual_seed(1)
    x = torch.randn(2, m, k).to(dtype)
    out, ref = module(x), module._reference_forward(x)
    weight = module.cpu_weight_cache
    assert weight.kind == FP32_KINDS.get(name, "dense") and out.dtype == ref.dtype == dtype
    if weight.kind != "dense":  # no fp32 copy of the weight beside the checkpoint's codes
        assert weight.nbytes < n * k
    _, s = quantized_input_and_magnitude(module, x)
    output_rounding = 2.0**-23 if dtype == torch.float32 else 2.0**-10
    excess = (out.float() - ref.float()).abs() - ((k + 2) * 2.0**-24 * s + output_rounding * ref.float().abs())
    assert excess.max() <= 0, f"exceeds the bound by {excess.max().item():.3g}"


@pytest.mark.parametrize("name", [n for n in FORMATS if n != "int8_sq"])  # W8A8: its int8 GEMM, tested above
def test_without_the_native_kernels_fp32_activations_get_the_reference_bit_for_bit(name, without_native):
    n, k = PB_SHAPE if name == "fp8_pb_wo" else (N, K)
    module = make_module(name, torch.float32, n=n, k=k)
    torch.manual_seed(1)
    x = torch.randn(2, 17, k)
    assert torch.equal(module(x), module._reference_forward(x))
    assert module.cpu_weight_cache.kind == "dense"


@pytest.mark.parametrize("m", [1, 3, 17])  # W8A8 takes torch._int_mm row by row at 1 and 3 rows, at once at 17
@pytest.mark.parametrize("name", list(FORMATS))
def test_bf16_activations_match_the_reference_within_the_bound(name, m):
    n, k = PB_SHAPE if name == "fp8_pb_wo" else (N, K)
    module = make_module(name, torch.bfloat16, n=n, k=k)
    torch.manual_seed(1)
    x = torch.randn(m, k, dtype=torch.bfloat16)
    out, ref = module(x), module._reference_forward(x)
    kind = module.cpu_weight_cache.kind
    assert kind == BF16_KINDS.get(name, "fp16pack")
    assert out.dtype == ref.dtype == torch.bfloat16
    excess = (out.float() - ref.float()).abs() - bf16_bound(module, x, ref, kind)
    assert excess.max() <= 0, f"exceeds the bound by {excess.max().item():.3g}"


def test_w8a8_rows_get_the_same_output_however_many_share_the_call():
    """bf16 W8A8 sums integers exactly at any row count (fp32 takes the reference's F.linear, whose
    float accumulation order is torch's choice per shape, as for an unquantized model)."""
    module = make_module("int8_sq", torch.bfloat16)
    torch.manual_seed(1)
    x = torch.randn(20, K, dtype=torch.bfloat16)
    alone = torch.cat([module(row) for row in x.split(1)])
    for m in range(1, 21):
        assert torch.equal(module(x[:m]), alone[:m]), f"{m} rows"


@pytest.mark.skipif(native.simd_width() not in cpu_weights.W8A8_NATIVE_SIMD_WIDTHS,
                    reason="W8A8 takes torch._int_mm here: the native library is not the AVX2 build")
@pytest.mark.parametrize("m", [1, 3, 17])  # torch._int_mm row by row at 1 and 3 rows, at once at 17
def test_w8a8_native_path_equals_the_int_mm_path_bit_for_bit(m, monkeypatch):
    module = make_module("int8_sq", torch.bfloat16)
    torch.manual_seed(1)
    x = torch.randn(m, K, dtype=torch.bfloat16)
    calls = []
    monkeypatch.setattr(native, "w8a8", lambda *args: calls.append(1) or native_w8a8(*args))
    out = module(x)
    assert calls, "the native kernel was not used"
    monkeypatch.setattr(cpu_weights, "W8A8_NATIVE_SIMD_WIDTHS", ())  # torch._int_mm
    module.cpu_weight_cache = None  # the choice is made when the weight form is built
    calls.clear()
    assert torch.equal(module(x), out) and not calls


@pytest.fixture
def without_native(monkeypatch):
    """The CPU backend as on a machine where the native kernels cannot be built."""
    monkeypatch.setattr(native, "library", lambda: None)


def at_byte_offset(t, offset=24):
    """A copy of t that starts `offset` bytes into its storage, as a weight mapped from a file can."""
    nbytes = t.numel() * t.element_size()
    raw = torch.empty(nbytes + 64, dtype=torch.uint8)[offset:offset + nbytes]
    return raw.view(t.dtype).view(t.shape).copy_(t)


def test_int8_kernel_gets_64_byte_aligned_operands(without_native):
    """torch's AVX-512 int8 matmul crashes on operands off a 64-byte boundary (see cpu_weights)."""
    module = make_module("int8_wo", torch.bfloat16)
    torch.manual_seed(1)
    x = torch.randn(3, K, dtype=torch.bfloat16)
    expected = module(x)
    module.weight = at_byte_offset(module.weight)
    x_view = at_byte_offset(x, offset=8)
    assert module.weight.data_ptr() % 64 and x_view.data_ptr() % 64
    assert torch.equal(module(x_view), expected)
    assert module.cpu_weight_cache.kind == "int8pack" and module.cpu_weight_cache.matrix.data_ptr() % 64 == 0
    assert module.weight is module.cpu_weight_cache.matrix  # adopted: the int8 weight is held once
    assert module.cpu_weight_cache.nbytes == N * 2  # only the kernel's bf16 unit scales


def test_w8a8_reads_an_unaligned_weight_in_place():
    """torch._int_mm takes any alignment: no copy of a memory-mapped int8 weight."""
    module = make_module("int8_sq", torch.bfloat16)
    x = torch.randn(3, K, dtype=torch.bfloat16)
    expected = module(x)
    module.weight = at_byte_offset(module.weight)
    assert torch.equal(module(x), expected)
    assert module.cpu_weight_cache.matrix is module.weight and module.cpu_weight_cache.nbytes == 0


def test_lean_activation_quantizers_give_the_reference_bits():
    torch.manual_seed(4)
    x = torch.randn(5, 7, 64) * torch.logspace(-6, 4, 7)[:, None]  # many magnitudes
    x[0, 0] = 0  # all-zero blocks
    # one NVFP4 block whose y = x / step hits every E2M1 tie exactly (global 0.25, amax 6 -> step 1)
    x[1, 1, :16] = torch.tensor([6, .25, .75, 1.25, 1.75, 2.5, 3.5, 5, -.25, -.75, -1.25, -1.75, -2.5, -3.5, -5, -0.0])
    for name, scale in (("nvfp4", torch.tensor(0.25)), ("nvfp4", torch.tensor(3e-3)), ("mxfp8", None)):
        fmt = get_format(name)
        for dtype in (torch.float32, torch.bfloat16):
            fast, ref = fast_quantize_activation(x.to(dtype), fmt, scale), quantize_activation(x.to(dtype), fmt, scale)
            assert torch.equal(fast.view(torch.int32), ref.view(torch.int32)), (name, dtype)


@pytest.mark.skipif(native.library() is None, reason="the native kernels cannot be built here")
@pytest.mark.parametrize("rows", [1, 300])  # a decode row on one thread; 300 x 256 values split across threads
def test_the_native_nvfp4_activation_quantizer_gives_the_reference_bits(rows, monkeypatch):
    calls = []
    kernel = native.nvfp4_fake_quantize
    monkeypatch.setattr(native, "nvfp4_fake_quantize", lambda *args: calls.append(1) or kernel(*args))
    torch.manual_seed(5)
    x = torch.randn(rows, 256) * torch.logspace(-8, 6, 16).repeat_interleave(16)  # every block its own magnitude
    x[0, :16] = torch.tensor([6, .25, .75, 1.25, 1.75, 2.5, 3.5, 5, -.25, -.75, -1.25, -1.75, -2.5, -3.5, -5, -0.0])
    x[0, 16:32] = 0
    fmt = get_format("nvfp4")
    for scale in (torch.tensor(0.25), torch.tensor(3e-3), torch.tensor(1e-30), torch.tensor(1e4)):
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            xd = x.to(dtype)
            fast, ref = fast_quantize_activation(xd, fmt, scale), quantize_activation(xd, fmt, scale)
            assert torch.equal(fast.view(torch.int32), ref.view(torch.int32)), (scale, dtype)
    assert len(calls) == 12
    x[-1, 100] = float("nan")  # the torch ops' NaN handling, which the kernel leaves to them
    fast, ref = fast_quantize_activation(x, fmt, torch.tensor(0.25)), quantize_activation(x, fmt, torch.tensor(0.25))
    assert torch.equal(fast.isnan(), ref.isnan()) and torch.equal(fast.nan_to_num(), ref.nan_to_num())


def test_int4_layers_torch_cannot_pack_fall_back_to_an_exact_path(without_native):
    module = make_module("int4_awq", torch.bfloat16, n=40)  # 40 % 16 != 0
    x = torch.randn(3, K, dtype=torch.bfloat16)
    out, ref = module(x), module._reference_forward(x)
    assert module.cpu_weight_cache.kind == "fp16pack"
    assert ((out.float() - ref.float()).abs() - bf16_bound(module, x, ref, "fp16pack")).max() <= 0


def test_weights_fp16_cannot_hold_fall_back_to_dense(without_native):
    module = make_module("fp8_pb_wo", torch.bfloat16, n=256, k=384)
    module.weight_scale.mul_(2.0**-30)  # dequantized weights ~1e-11: below fp16's smallest subnormal
    x = torch.randn(3, 384, dtype=torch.bfloat16)
    assert torch.equal(module(x), module._reference_forward(x))
    assert module.cpu_weight_cache.kind == "dense"


def test_the_cache_never_enters_the_checkpoint():
    module = make_module("w4a8_awq", torch.bfloat16)
    keys = set(module.state_dict())
    module(torch.randn(2, K, dtype=torch.bfloat16))
    assert module.cpu_weight_cache is not None and module.cpu_weight_cache.nbytes > 0
    assert set(module.state_dict()) == keys
    assert all("cache" not in name for name, _ in module.named_buffers())


@pytest.mark.parametrize("name, dtype", [("int4_awq", torch.bfloat16), ("nvfp4", torch.float32),
                                         ("int8_wo", torch.bfloat16)])
def test_load_state_dict_invalidates_the_cache(name, dtype):
    module, other = make_module(name, dtype, seed=0), make_module(name, dtype, seed=1)
    x = torch.randn(4, K).to(dtype)
    before = module(x)
    module.load_state_dict(other.state_dict())
    assert torch.equal(module(x), other(x))
    assert not torch.equal(module(x), before)


def test_in_place_and_replaced_buffers_invalidate_the_cache():
    module = make_module("int4_awq", torch.bfloat16)
    module.bias = None
    x = torch.randn(4, K, dtype=torch.bfloat16)
    before = module(x).float()
    module.weight_scale.mul_(2)  # exact in fp32 and bf16, so the output doubles exactly
    torch.testing.assert_close(module(x).float(), 2 * before, rtol=0, atol=0)
    module.weight_scale = module.weight_scale / 2  # a new tensor object
    torch.testing.assert_close(module(x).float(), before, rtol=0, atol=0)


def test_changing_the_activation_dtype_rebuilds_the_cache(without_native):
    module = make_module("int8_wo", torch.float32)
    module(torch.randn(2, K))
    assert module.cpu_weight_cache.kind == "dense"
    module(torch.randn(2, K, dtype=torch.bfloat16))
    assert module.cpu_weight_cache.kind == "int8pack"


def test_deepcopy_drops_the_cache_and_rebuilds_it():
    module = make_module("fp8", torch.bfloat16)
    x = torch.randn(3, K, dtype=torch.bfloat16)
    out = module(x)
    clone = copy.deepcopy(module)
    assert clone.cpu_weight_cache is None
    assert torch.equal(clone(x), out)


def test_reference_forward_switch_restores_each_layer():
    model = nn.Sequential(make_module("int4_awq", torch.bfloat16), nn.ReLU(),
                          make_module("int8_wo", torch.bfloat16, k=N))
    model[2].force_reference = True  # a per-layer setting survives the context manager
    x = torch.randn(3, K, dtype=torch.bfloat16)
    with reference_forward(model):
        inside = model(x)
    expected = model[2]._reference_forward(torch.relu(model[0]._reference_forward(x)))
    assert torch.equal(inside, expected)
    assert model[0].force_reference is False and model[2].force_reference is True
    model[0].cpu_weight_cache = None
    model[0](x)
    assert model[0].cpu_weight_cache is not None  # the fast path is back


def test_inputs_that_need_a_gradient_take_the_differentiable_reference():
    module = make_module("int4_awq", torch.float32)
    x = torch.randn(3, K, requires_grad=True)
    out = module(x)
    assert torch.equal(out, module._reference_forward(x))
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("name", ["int4_awq", "int8_sq", "fp8", "nvfp4"])
def test_a_quantized_model_on_the_cpu_path_tracks_the_reference(name, token_ids):
    model = tiny_llama(hidden_size=128, intermediate_size=256).to(torch.bfloat16)
    quantize(model, PTQConfig(qformat=name, algorithm="max", group_size=64 if name == "int4_awq" else None),
             forward_loop=lambda m: m(token_ids))
    with torch.no_grad():
        fast = model(token_ids).logits
        with reference_forward(model):
            ref = model(token_ids).logits
    # bf16 end to end: each layer may differ by a couple of bf16 roundings; 30 dB is ~3% rms.
    assert sqnr_db(ref, fast) > 30


def test_the_package_imports_and_runs_without_triton(tmp_path):
    probe = (
        "import sys; sys.modules['triton'] = None\n"  # `import triton` now raises ImportError
        "import torch, hf_ptq_plugin\n"
        "from hf_ptq_plugin.backends.triton_linear import triton_available\n"
        "m = hf_ptq_plugin.QuantLinear.from_linear(torch.nn.Linear(256, 64), hf_ptq_plugin.get_format('int4_awq'))\n"
        "y = m(torch.randn(2, 256))\n"
        "kernels = [n for n in sys.modules if n.startswith('hf_ptq_plugin.kernels.')]\n"
        "print(triton_available(), tuple(y.shape), kernels)\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, check=True, capture_output=True, text=True)
    assert out.stdout.split("\n")[0] == "False (2, 64) []"


@pytest.mark.skipif(native.library() is None,
                    reason="no C compiler, or neither AVX-512 nor AVX2 (+F16C, FMA) on this machine")
@pytest.mark.parametrize("m", [1, 17])
def test_nvfp4_with_in_features_an_odd_number_of_blocks_takes_the_native_kernel(m):
    """48 inputs: three 16-element blocks, 24 bytes of codes per row (not a multiple of one 16-byte load)."""
    module = make_module("nvfp4", torch.bfloat16, k=48)
    torch.manual_seed(1)
    x = torch.randn(m, 48, dtype=torch.bfloat16)
    out, ref = module(x), module._reference_forward(x)
    assert module.cpu_weight_cache.kind == "native"
    assert ((out.float() - ref.float()).abs() - bf16_bound(module, x, ref, "native")).max() <= 0
