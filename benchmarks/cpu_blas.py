"""fp32 products of layer-streamed calibration through torch's BLAS and through OpenBLAS (`backends/cpu_blas.py`).

The operations of one Llama-3-8B block calibrated on 2048-token batches, each timed through both libraries in
this process: the Linears (`linear`: 2048 x 4096 -> 14336 and 2048 x 14336 -> 4096), an input Hessian's upper
triangle (`add_upper_gram_`: x^T x for 2048 tokens at K = 14336, torch's strips against one syrk), the Cholesky
of a 14336 x 14336 Hessian in place (`cholesky_lower_`: the blocked torch form against LAPACK's potrf) and
GPTQ's rank-128 update of a down_proj's remaining columns (`addmm_`). Each is run once to warm up, then the best
of `--repeats`, the two libraries interleaved so that other work on the machine slows both alike. Threads:
torch's count for both (`torch.get_num_threads()`).

    python benchmarks/cpu_blas.py [--repeats 3] [--markdown]
"""

import argparse
import os
import platform
import time

import torch
from tables import print_table  # benchmarks/ is on sys.path

from hf_ptq_plugin.backends import cpu_blas
from hf_ptq_plugin.calibration import hessian_algebra

HIDDEN, INTERMEDIATE, TOKENS, COLUMN_BLOCK = 4096, 14336, 2048, 128


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--markdown", action="store_true")
    return parser.parse_args()


def using(name: str) -> None:
    os.environ[cpu_blas.ENV] = name
    cpu_blas.backend.cache_clear()


def cases():
    """[(operation, GFLOP, {library: run}), ...]: each run does the operation once on fresh or reset inputs."""
    x_hidden, x_wide = torch.randn(TOKENS, HIDDEN), torch.randn(TOKENS, INTERMEDIATE)
    up, down = torch.randn(INTERMEDIATE, HIDDEN), torch.randn(HIDDEN, INTERMEDIATE)
    gram = torch.zeros(INTERMEDIATE, INTERMEDIATE)
    hessian = _positive_definite(INTERMEDIATE)
    factor = torch.empty_like(hessian)
    updated, errors = torch.randn(INTERMEDIATE, HIDDEN), torch.randn(COLUMN_BLOCK, HIDDEN)
    feedback = torch.randn(COLUMN_BLOCK, INTERMEDIATE)

    def cholesky():
        factor.copy_(hessian)
        hessian_algebra.cholesky_lower_(factor)

    both = ("torch", "openblas")
    return [
        ("linear 2048 x 4096 -> 14336", 2 * TOKENS * HIDDEN * INTERMEDIATE,
         dict.fromkeys(both, lambda: cpu_blas.linear(x_hidden, up))),
        ("linear 2048 x 14336 -> 4096", 2 * TOKENS * HIDDEN * INTERMEDIATE,
         dict.fromkeys(both, lambda: cpu_blas.linear(x_wide, down))),
        ("x^T x upper, 2048 tokens, K = 14336", TOKENS * INTERMEDIATE ** 2,
         dict.fromkeys(both, lambda: hessian_algebra.add_upper_gram_(gram, x_wide))),
        ("Cholesky in place, K = 14336 (with a copy)", INTERMEDIATE ** 3 / 3, dict.fromkeys(both, cholesky)),
        ("rank-128 update, 14336 x 4096", 2 * INTERMEDIATE * HIDDEN * COLUMN_BLOCK,
         dict.fromkeys(both, lambda: cpu_blas.addmm_(updated, feedback.t(), errors))),
    ]


def _positive_definite(k: int) -> torch.Tensor:
    """x^T x + I for 8192 random tokens: a Hessian's spectrum, rank-deficient but for the damping."""
    x = torch.randn(4 * TOKENS, k)
    h = hessian_algebra.symmetric_gram(x)
    h.diagonal().add_(1.0)
    return h


def best_seconds(runs: dict, repeats: int) -> dict:
    best = dict.fromkeys(runs, float("inf"))
    for name, run in runs.items():
        using(name)
        run()
    for _ in range(repeats):
        for name, run in runs.items():
            using(name)
            start = time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def main():
    args = parse_args()
    if cpu_blas._library() is None:
        raise SystemExit("the scipy-openblas32 package is not installed: nothing to compare")
    rows = []
    for operation, flops, runs in cases():
        with cpu_blas.calibrating():  # where calibration multiplies
            seconds = best_seconds(runs, args.repeats)
        rates = {name: flops / s / 1e9 for name, s in seconds.items()}
        rows.append([operation, f"{seconds['torch']:.3f}", f"{rates['torch']:.0f}", f"{seconds['openblas']:.3f}",
                     f"{rates['openblas']:.0f}", f"{seconds['torch'] / seconds['openblas']:.2f}"])
    os.environ.pop(cpu_blas.ENV)
    cpu_blas.backend.cache_clear()
    cpu = cpu_blas.cpuinfo_field("model name") or platform.processor() or platform.machine()
    print(f"{cpu}, {torch.get_num_threads()} threads; calibration here multiplies with: {cpu_blas.backend()}")
    print_table(["operation", "torch s", "torch GFLOP/s", "OpenBLAS s", "OpenBLAS GFLOP/s", "speed-up"], rows,
                args.markdown)


if __name__ == "__main__":
    main()
