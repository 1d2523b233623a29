"""cpu_blas: OpenBLAS's products and factorization against torch's, and what falls back to torch."""

import pytest
import torch

from hf_ptq_plugin.backends import cpu_blas
from hf_ptq_plugin.calibration import hessian_algebra

pytestmark = pytest.mark.skipif(cpu_blas._library() is None, reason="the scipy-openblas32 package is not installed")


@pytest.fixture
def openblas(monkeypatch):
    """This test's products through OpenBLAS, whichever BLAS this CPU measures faster."""
    monkeypatch.setenv(cpu_blas.ENV, "openblas")
    monkeypatch.setattr(cpu_blas, "MIN_MULTIPLY_ADDS", 0)  # these small products too
    cpu_blas.backend.cache_clear()
    with cpu_blas.calibrating():
        yield
    cpu_blas.backend.cache_clear()


@pytest.fixture
def openblas_calls(monkeypatch):
    """The products OpenBLAS did (the `_sgemm` calls that returned True)."""
    done, sgemm = [], cpu_blas._sgemm
    monkeypatch.setattr(cpu_blas, "_sgemm", lambda *args: sgemm(*args) and (done.append(args) or True))
    return done


def _close(got, expected):
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("a_layout", ["rows", "transposed", "strided"])
@pytest.mark.parametrize("b_layout", ["rows", "transposed", "strided"])
def test_addmm_matches_torch_for_every_operand_layout(openblas, openblas_calls, a_layout, b_layout):
    torch.manual_seed(0)

    def operand(rows, columns, layout):
        if layout == "rows":
            return torch.randn(rows, columns)
        if layout == "transposed":
            return torch.randn(columns, rows).t()
        return torch.randn(rows + 3, columns + 5)[2:2 + rows, 1:1 + columns]  # a view inside a larger matrix

    a, b = operand(37, 53, a_layout), operand(53, 29, b_layout)
    base = torch.randn(40, 35)
    before = base.clone()
    c = base[1:38, 2:31]  # rows apart by 35: an output view, written in place
    expected = c.clone().addmm_(a, b, alpha=-0.5, beta=2.0)
    assert cpu_blas.addmm_(c, a, b, alpha=-0.5, beta=2.0) is c
    _close(c, expected)
    assert len(openblas_calls) == 1
    outside = torch.ones(40, 35, dtype=torch.bool)
    outside[1:38, 2:31] = False
    assert torch.equal(base[outside], before[outside])


def test_addmm_with_beta_zero_ignores_what_the_output_held(openblas):
    a, b = torch.randn(8, 16), torch.randn(16, 4)
    c = torch.full((8, 4), float("nan"))
    _close(cpu_blas.addmm_(c, a, b, beta=0.0), a @ b)


def test_what_openblas_cannot_take_goes_to_torch(openblas, openblas_calls):
    a64, b64 = torch.randn(6, 5, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    _close(cpu_blas.addmm_(torch.zeros(6, 3, dtype=torch.float64), a64, b64), a64 @ b64)  # not fp32
    expanded = torch.randn(1, 5).expand(6, 5)  # rows 0 apart: no leading dimension describes it
    b = torch.randn(5, 3)
    _close(cpu_blas.addmm_(torch.zeros(6, 3), expanded, b), expanded @ b)
    every_other = torch.randn(6, 10)[:, ::2]  # no unit stride
    _close(cpu_blas.addmm_(torch.zeros(6, 3), every_other, b), every_other @ b)
    c = torch.ones(6, 3)
    _close(cpu_blas.addmm_(c, torch.zeros(6, 0), torch.zeros(0, 3), beta=3.0), torch.full((6, 3), 3.0))
    with pytest.raises(RuntimeError):  # a shape mismatch is torch's to name
        cpu_blas.addmm_(torch.zeros(6, 3), torch.randn(6, 4), b)
    assert not openblas_calls


def test_small_products_stay_with_torch(monkeypatch, openblas_calls):
    monkeypatch.setenv(cpu_blas.ENV, "openblas")
    cpu_blas.backend.cache_clear()
    with cpu_blas.calibrating():
        cpu_blas.mm(torch.randn(64, 64), torch.randn(64, 64))  # 2^18 multiply-adds
        assert not openblas_calls
        cpu_blas.mm(torch.randn(256, 256), torch.randn(256, 256))  # 2^24
        assert len(openblas_calls) == 1
    cpu_blas.backend.cache_clear()


def test_linear_matches_torch_with_bias_and_leading_dimensions(openblas):
    x, w, bias = torch.randn(2, 7, 24), torch.randn(12, 24), torch.randn(12)
    _close(cpu_blas.linear(x, w, bias), torch.nn.functional.linear(x, w, bias))
    half = cpu_blas.linear(x.bfloat16(), w.bfloat16())  # torch's own path
    assert half.dtype == torch.bfloat16 and half.shape == (2, 7, 12)


def test_upper_gram_adds_on_and_above_the_diagonal_only(openblas):
    x, gram = torch.randn(50, 20), torch.randn(20, 20)
    before = gram.clone()
    assert cpu_blas.add_upper_gram_(gram, x)
    _close(gram.triu(), (before + x.t() @ x).triu())
    assert torch.equal(gram.tril(-1), before.tril(-1))
    assert not cpu_blas.add_upper_gram_(torch.zeros(20, 20), torch.randn(50, 40)[:, ::2])  # for the strips


def test_cholesky_factors_in_place_and_reports_the_failing_minor(openblas):
    x = torch.randn(80, 30)
    h = x.t() @ x + torch.eye(30)
    m = h.clone()
    assert cpu_blas.cholesky_lower_(m) == 0
    _close(m.tril(), torch.linalg.cholesky(h))
    not_positive = h.clone()
    not_positive[7, 7] = -1.0
    assert cpu_blas.cholesky_lower_(not_positive.clone()) == 8
    with pytest.raises(torch.linalg.LinAlgError, match="order 8"):
        hessian_algebra.cholesky_lower_(not_positive)


def test_the_algebra_gives_one_factor_through_either_blas(monkeypatch):
    x = torch.randn(300, 700)  # K = 700: torch's blocked Cholesky takes two block columns
    factors = {}
    for name in cpu_blas.CHOICES:
        monkeypatch.setenv(cpu_blas.ENV, name)
        cpu_blas.backend.cache_clear()
        assert cpu_blas.backend() == name
        with cpu_blas.calibrating():
            gram = hessian_algebra.symmetric_gram(x)
            gram.diagonal().add_(1.0)
            factors[name] = hessian_algebra.feedback_factor_(gram.flip(0).flip(1).contiguous())
    cpu_blas.backend.cache_clear()
    torch.testing.assert_close(factors["openblas"], factors["torch"], rtol=1e-3, atol=1e-4)
    assert torch.equal(factors["openblas"].tril(-1), torch.zeros(700, 700))  # upper triangular: V = R D^-1


def test_a_bad_choice_names_the_valid_ones(monkeypatch):
    monkeypatch.setenv(cpu_blas.ENV, "mkl")
    cpu_blas.backend.cache_clear()
    with pytest.raises(ValueError, match=r"HF_PTQ_CPU_BLAS='mkl'.*'openblas', 'torch'"):
        cpu_blas.backend()
    cpu_blas.backend.cache_clear()


@pytest.mark.parametrize("vendor, chosen", [("AuthenticAMD", "openblas"), ("GenuineIntel", "torch"), ("", "torch")])
def test_without_a_choice_amd_cpus_multiply_with_openblas(monkeypatch, vendor, chosen):
    monkeypatch.delenv(cpu_blas.ENV, raising=False)
    monkeypatch.setattr(cpu_blas, "_cpu_vendor", lambda: vendor)
    cpu_blas.backend.cache_clear()
    assert cpu_blas.backend() == chosen
    cpu_blas.backend.cache_clear()


def test_outside_calibration_products_stay_with_torch(monkeypatch):
    monkeypatch.setenv(cpu_blas.ENV, "openblas")
    cpu_blas.backend.cache_clear()
    calls = []
    monkeypatch.setattr(cpu_blas, "_sgemm", lambda *args: calls.append(args) or False)
    x, w = torch.randn(4, 8), torch.randn(3, 8)
    assert torch.equal(cpu_blas.linear(x, w), torch.nn.functional.linear(x, w)) and not calls
    with cpu_blas.calibrating():
        cpu_blas.linear(x, w)
    assert len(calls) == 1  # tried OpenBLAS (here told the layout does not fit, so torch multiplied)
    cpu_blas.backend.cache_clear()
