"""Runs the Triton kernel tests (`test_kernels_interpreted.py`) under Triton's interpreter on CPU.

TRITON_INTERPRET=1 must be set before triton is imported (its library functions are decorated
at import), and in this process transformers imported triton already; so on a machine without
a GPU the kernel tests run in a fresh Python with the variable set, and this test reports them.
With a GPU, `test_kernels_interpreted.py` runs the compiled kernels in the main run instead.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
CASES = Path(__file__).with_name("test_kernels_interpreted.py")


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the kernel tests run compiled, in this process")
def test_kernel_suite_passes_under_the_triton_interpreter():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(CASES)],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    report = result.stdout[-6000:] + result.stderr[-2000:]
    assert result.returncode == 0, report
    passed = re.search(r"(\d+) passed", result.stdout)
    # Every case must have run: only the GPU-only forward tests may skip.
    assert passed and int(passed.group(1)) >= 50, report
    assert not re.search(r"\d+ (failed|error)", result.stdout), report
