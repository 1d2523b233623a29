"""The in-place K x K algebra of GPTQ against torch's own: grams, permutation, Cholesky, the feedback factor."""

import pytest
import torch

from hf_ptq_plugin.calibration import hessian_algebra
from hf_ptq_plugin.calibration.hessian_algebra import symmetric_gram


@pytest.mark.parametrize("k", [96, 200, 576])
def test_symmetric_gram_is_x_transpose_x(k):
    torch.manual_seed(0)
    x = torch.randn(300, k)
    gram = symmetric_gram(x)
    torch.testing.assert_close(gram, x.T @ x, rtol=1e-5, atol=1e-4)
    assert torch.equal(gram, gram.T)


@pytest.mark.parametrize("strips", [28, 2])
def test_gram_sums_in_place_over_batches_in_strips(monkeypatch, strips):
    """Batches summed into one upper triangle, then mirrored: x^T x of all tokens, exactly symmetric,
    in the matrix given (2 strips: wider strips than GRAM_STRIP, as for a down_proj's input)."""
    monkeypatch.setattr(hessian_algebra, "GRAM_STRIPS", strips)
    torch.manual_seed(0)
    x = torch.randn(300, 576, dtype=torch.float64)
    gram = torch.zeros(576, 576, dtype=torch.float64)
    for batch in x.split(100):
        assert hessian_algebra.add_upper_gram_(gram, batch) is gram
    hessian_algebra.mirror_upper_(gram)
    torch.testing.assert_close(gram, x.T @ x, rtol=1e-12, atol=1e-10)
    assert torch.equal(gram, gram.T)


@pytest.mark.parametrize("n, block", [(37, 16), (300, 64), (600, 512)])
def test_blocked_cholesky_in_place_is_lapacks(monkeypatch, n, block):
    monkeypatch.setattr(hessian_algebra, "TRIANGULAR_BLOCK", block)
    torch.manual_seed(0)
    hessian = symmetric_gram(torch.randn(2 * n, n, dtype=torch.float64)) / n
    factor = hessian.clone()
    hessian_algebra.cholesky_lower_(factor)
    torch.testing.assert_close(factor, torch.linalg.cholesky(hessian), rtol=1e-10, atol=1e-12)
    assert torch.equal(factor, factor.tril())


def test_blocked_cholesky_names_the_first_minor_that_is_not_positive_definite(monkeypatch):
    monkeypatch.setattr(hessian_algebra, "TRIANGULAR_BLOCK", 4)
    m = torch.eye(10, dtype=torch.float64)
    m[6, 6] = -1.0
    with pytest.raises(torch.linalg.LinAlgError, match="leading minor of order 7 is not"):
        hessian_algebra.cholesky_lower_(m)


@pytest.mark.parametrize("n, block", [(37, 16), (300, 64), (1100, 512)])
def test_gptq_feedback_factor_is_the_upper_factor_of_h_over_its_diagonal_in_place(monkeypatch, n, block):
    """From J H J, in its own storage: V = R D^-1 with H = R R^T, R upper triangular, D = diag(R); so V is unit
    upper triangular, and V^-1 is H^-1's upper Cholesky factor with its rows over their diagonal (GPTQ's)."""
    monkeypatch.setattr(hessian_algebra, "TRIANGULAR_BLOCK", block)
    torch.manual_seed(0)
    x = torch.randn(4 * n, n, dtype=torch.float64)
    hessian = symmetric_gram(x) / n
    reverse = torch.arange(n - 1, -1, -1)
    reversed_h = hessian[reverse[:, None], reverse].clone()
    factor = hessian_algebra.feedback_factor_(reversed_h)
    assert factor.data_ptr() == reversed_h.data_ptr()
    assert torch.equal(factor, factor.triu())
    assert torch.equal(factor.diagonal(), torch.ones(n, dtype=torch.float64))
    upper = torch.linalg.cholesky(torch.linalg.inv(hessian), upper=True)
    torch.testing.assert_close(torch.linalg.inv(factor), upper / upper.diagonal()[:, None], rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("gather_elements", [1 << 24, 0])
@pytest.mark.parametrize("n", [1, 7, 300, 600])
def test_symmetric_permutation_in_place_is_the_gather(monkeypatch, n, gather_elements):
    """Through a permuted copy, and (0) through the permutation's cycles, as large matrices are."""
    monkeypatch.setattr(hessian_algebra, "GATHER_ELEMENTS", gather_elements)
    torch.manual_seed(n)
    hessian = symmetric_gram(torch.randn(2 * n, n))
    order = torch.randperm(n)
    permuted = hessian.clone()
    hessian_algebra.permute_symmetric_(permuted, order)
    assert torch.equal(permuted, hessian[order[:, None], order])
