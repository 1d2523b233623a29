"""Packaging: our kernels import as hf_ptq_plugin.kernels and never shadow Hugging Face's `kernels`."""

import subprocess
import sys
from pathlib import Path

import transformers.utils

REPO = Path(__file__).resolve().parents[1]


def test_transformers_still_sees_hugging_faces_kernels_package_as_absent(tmp_path):
    import hf_ptq_plugin  # noqa: F401  (importing us must not change the answer)
    import hf_ptq_plugin.kernels

    # Even where the repository root is on sys.path (python -m pytest from the root), our
    # kernels/ folder is not a `kernels` distribution, so transformers does not take it for one.
    assert transformers.utils.is_kernels_available() is False
    assert hf_ptq_plugin.kernels.__name__ == "hf_ptq_plugin.kernels"
    probe = ("import transformers.utils, hf_ptq_plugin, importlib.util; "
             "print(importlib.util.find_spec('kernels'), transformers.utils.is_kernels_available())")
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, check=True, capture_output=True, text=True)
    assert out.stdout.split() == ["None", "False"]


def test_non_editable_install_gives_a_working_import(tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(REPO)], check=True, capture_output=True)
    probe = ("import hf_ptq_plugin, hf_ptq_plugin.kernels, hf_ptq_plugin.model_cards, importlib.util; "
             "print(hf_ptq_plugin.__file__); print(importlib.util.find_spec('kernels'))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env={"PYTHONPATH": str(target)},
                         check=True, capture_output=True, text=True).stdout.split("\n")
    assert out[0].startswith(str(target)) and out[1] == "None"
