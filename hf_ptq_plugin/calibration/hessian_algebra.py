"""The K x K algebra GPTQ needs, in the matrix's own storage: a down_proj's Hessian is K^2 fp32 (822 MB at
K = 14336), and a second copy of it would be the largest allocation of a whole calibration.

- `add_upper_gram_` / `mirror_upper_`: x^T x summed over batches on and above the diagonal, then mirrored;
- `permute_symmetric_`: the column order (and its reversal) applied to both sides;
- `feedback_factor_`: GPTQ's error-feedback coefficients from J H J: a blocked Cholesky, a half-turn and a
  column scaling, each in place, beside (K, TRIANGULAR_BLOCK) temporaries.
"""

import torch

from ..backends import cpu_blas

TRIANGULAR_BLOCK = 512  # block columns of the Cholesky: (K, 512) temporaries
GRAM_STRIP = 192  # rows of x^T x per GEMM in add_upper_gram_: the fastest of 96-2048 at K = 576, 1536 and 4096
GRAM_STRIPS = 28  # wider inputs take K / 28 rows: 512 at K = 14336, 15% faster there than 192
GATHER_ELEMENTS = 1 << 24  # permute_rows_ copies matrices up to this size (64 MB of fp32)


def add_upper_gram_(gram: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """gram += x^T x (K, K) for x (T, K), in place, on and above the diagonal only: strips of rows,
    each one GEMM from the diagonal rightwards, about half the multiply-adds of `x.T @ x` for wide
    inputs and no (K, K) temporary (a down_proj's is K^2 fp32). `mirror_upper_` completes it. On a CPU where
    OpenBLAS is the faster BLAS, its syrk does the same in one call (`cpu_blas`)."""
    if cpu_blas.add_upper_gram_(gram, x):
        return gram
    k = x.shape[1]
    strip = max(GRAM_STRIP, k // GRAM_STRIPS)
    for start in range(0, k, strip):
        stop = min(start + strip, k)
        gram[start:stop, start:].addmm_(x[:, start:stop].T, x[:, start:])  # strided views: no copy
    return gram


def mirror_upper_(m: torch.Tensor) -> torch.Tensor:
    """Copies m's upper triangle onto its lower one, in place: exactly symmetric, as the Cholesky needs."""
    k = m.shape[0]
    for start in range(0, k, GRAM_STRIP):
        stop = min(start + GRAM_STRIP, k)
        m[stop:, start:stop] = m[start:stop, stop:].T
        m[start:stop, start:stop] = m[start:stop, start:stop].triu() + m[start:stop, start:stop].triu(1).T
    return m


def symmetric_gram(x: torch.Tensor) -> torch.Tensor:
    """x^T x (K, K) for x (T, K), exactly symmetric."""
    gram = torch.zeros(x.shape[1], x.shape[1], dtype=x.dtype, device=x.device)
    return mirror_upper_(add_upper_gram_(gram, x))


def permute_symmetric_(m: torch.Tensor, order: torch.Tensor) -> None:
    """m <- m[order][:, order] for a symmetric m, in place: rows, then the transpose (m[order]^T is
    m[:, order], as m is symmetric), then rows again."""
    permute_rows_(m, order)
    transpose_square_(m)
    permute_rows_(m, order)


def permute_rows_(m: torch.Tensor, order: torch.Tensor) -> None:
    """m[i] <- m[order[i]] for every row, in place. Up to GATHER_ELEMENTS through one permuted copy (the
    Python loop over cycles costs more than such a copy weighs); larger, each cycle of the permutation with
    one row of scratch."""
    if m.numel() <= GATHER_ELEMENTS:
        m.copy_(m[order])
        return
    order = order.tolist()
    moved = [False] * len(order)
    for first in range(len(order)):
        if moved[first] or order[first] == first:
            continue
        saved, i = m[first].clone(), first
        while order[i] != first:  # row order[i] is still unmoved: it is the cycle's next
            m[i] = m[order[i]]
            moved[i], i = True, order[i]
        m[i], moved[i] = saved, True


def transpose_square_(m: torch.Tensor, tile: int = 128) -> None:
    """m <- m^T in place, swapping tiles across the diagonal through one tile of scratch. Each tile is
    transposed by `contiguous()` (torch's blocked transpose) before it is written; 128 rows, as 256-row
    tiles of a large m copy many times slower (their rows fall in the same cache sets)."""
    n = m.shape[0]
    for a in range(0, n, tile):
        b = min(a + tile, n)
        m[a:b, a:b] = m[a:b, a:b].T.contiguous()
        for c in range(b, n, tile):
            d = min(c + tile, n)
            saved = m[a:b, c:d].T.contiguous()
            m[a:b, c:d] = m[c:d, a:b].T.contiguous()
            m[c:d, a:b] = saved


def feedback_factor_(reversed_h: torch.Tensor) -> torch.Tensor:
    """V = R D^-1, where H = R R^T with R upper triangular and D = diag(R), given J H J (J the reversal),
    computed in its storage, which it returns: beside it only (K, TRIANGULAR_BLOCK) temporaries exist.

    Cholesky J H J = L L^T gives H = R R^T with R = J L J. A weight row's loss (w - q)^T H (w - q) is then
    |R^T (w - q)|^2, whose component i involves columns 0..i only: rounding the columns in order, column i
    made closest to zero is q_i = round(w_i + sum_{j<i} V[j, i] (w_j - q_j)), the errors against the
    original weights (Babai's nearest plane). That is GPTQ's error feedback exactly (with H^-1's upper
    Cholesky factor U = R^-1 and errors against the updated weights) without inverting anything: one
    Cholesky instead of a Cholesky and a triangular inverse, half the work.
    """
    cholesky_lower_(reversed_h)
    rotate_half_turn_(reversed_h)  # J M J: element (i, j) from (n-1-i, n-1-j)
    return reversed_h.div_(reversed_h.diagonal().clone())  # column j over R[j, j]


def cholesky_lower_(m: torch.Tensor) -> None:
    """m <- L, lower triangular with m = L L^T, in place, by block columns from the left (faster than torch's
    LAPACK call, which also copies m: the trailing updates are GEMMs).

    With m = [[A, B^T], [B, C]]: A = L11 L11^T (a small Cholesky), L21 = B L11^-T, and C - L21 L21^T is
    factored next. Only its lower triangle is updated, a row strip at a time up to the diagonal.
    On a CPU where OpenBLAS is the faster BLAS, its LAPACK potrf factors m in place instead (`cpu_blas`).
    """
    info = cpu_blas.cholesky_lower_(m)
    if info is not None:
        _raise_if_not_positive_definite(info)
        _zero_above_diagonal_(m)
        return
    n, block = m.shape[0], TRIANGULAR_BLOCK
    for a in range(0, n, block):
        b = min(a + block, n)
        l11, info = torch.linalg.cholesky_ex(m[a:b, a:b])
        _raise_if_not_positive_definite(a + info.item() if info.item() > 0 else 0)
        m[a:b, a:b], m[a:b, b:] = l11, 0.0
        if b == n:
            break
        l21 = m[b:, a:b] @ _lower_inverse(l11).T
        m[b:, a:b] = l21
        for r in range(b, n, block):
            s = min(r + block, n)
            m[r:s, b:s].addmm_(l21[r - b:s - b], l21[:s - b].T, alpha=-1.0)


def _zero_above_diagonal_(m: torch.Tensor) -> None:
    """m's strict upper triangle <- 0, a strip of rows at a time (no (K, K) temporary)."""
    n = m.shape[0]
    for a in range(0, n, TRIANGULAR_BLOCK):
        b = min(a + TRIANGULAR_BLOCK, n)
        m[a:b, a:b] = m[a:b, a:b].tril()
        m[a:b, b:] = 0.0


def _raise_if_not_positive_definite(order: int) -> None:
    """`order`: the first leading minor that is not positive, 0 if none (LAPACK's info)."""
    if order > 0:
        raise torch.linalg.LinAlgError(
            f"GPTQ's damped Hessian is not positive-definite (the leading minor of order {order} is not); raise "
            f"perc_damp or calibrate on more tokens")


def _lower_inverse(block: torch.Tensor) -> torch.Tensor:
    """The inverse of a small lower-triangular block (a diagonal block of TRIANGULAR_BLOCK columns)."""
    eye = torch.eye(block.shape[0], dtype=block.dtype, device=block.device)
    return torch.linalg.solve_triangular(block, eye, upper=False)


def rotate_half_turn_(m: torch.Tensor, chunk: int = 1 << 22) -> None:
    """m <- J m J (m[i, j] <- m[n-1-i, n-1-j]) in place: the flattened storage reversed, a chunk from each
    end at a time."""
    flat = m.view(-1)
    total = flat.numel()
    for start in range(0, total // 2, chunk):
        stop = min(start + chunk, total // 2)
        front, back = flat[start:stop], flat[total - stop:total - start]
        saved = front.clone()
        front.copy_(back.flip(0))
        back.copy_(saved.flip(0))
