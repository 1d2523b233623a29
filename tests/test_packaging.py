"""Packaging: our kernels import as hf_ptq_plugin.kernels and never shadow Hugging Face's `kernels`;
the built wheel installs and works without the source tree."""

import json
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Where each `kernels` comes from, and whether transformers' own loader imports, as seen by a
# fresh interpreter.
PROBE = """
import importlib.util, json
import transformers.modeling_utils, hf_ptq_plugin, hf_ptq_plugin.kernels.int4_gemm as ours
print(json.dumps({"kernels": importlib.util.find_spec("kernels").origin, "ours": ours.__file__,
                  "plugin": hf_ptq_plugin.__file__}))
"""


def _probe(python, cwd, env=None):
    out = subprocess.run([str(python), "-c", PROBE], cwd=cwd, env=env, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _is_hugging_faces_kernels(origin):
    return "site-packages" in origin and not origin.startswith(str(REPO / "kernels"))


@pytest.mark.parametrize("where", ["repository root", "elsewhere"])
def test_hugging_faces_kernels_is_never_shadowed(where, tmp_path):
    cwd = REPO if where == "repository root" else tmp_path
    found = _probe(sys.executable, cwd)
    assert _is_hugging_faces_kernels(found["kernels"]), found
    assert Path(found["ours"]).resolve() == (REPO / "kernels" / "int4_gemm.py").resolve()


@pytest.mark.parametrize("command", [["-m", "hf_ptq_plugin", "--help"], ["-m", "pytest", "--version"]])
def test_module_entry_points_run_from_the_repository_root(command):
    out = subprocess.run([sys.executable, *command], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory):
    """The wheel built with `pip wheel --no-deps`, installed into a throwaway venv that sees this
    environment's dependencies (a .pth line naming its site-packages, which does not run the
    editable install's finder) but not the source tree."""
    root = tmp_path_factory.mktemp("wheel")
    # Built from a copy of the tracked files: an in-tree build would leave build metadata in the
    # repository, which importlib.metadata then reads before the installed package's.
    tracked = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                             check=True, capture_output=True, text=True).stdout.split()
    source = root / "source"
    for name in tracked:
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, source / name, follow_symlinks=False)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--wheel-dir", str(root / "dist"), str(source)], check=True, capture_output=True)
    wheel = next((root / "dist").glob("hf_ptq_plugin-*.whl"))
    venv.EnvBuilder(with_pip=False).create(root / "venv")
    python = root / "venv" / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          check=True, capture_output=True, text=True).stdout.strip()
    (Path(site) / "dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps",
                    "--ignore-installed", str(wheel)], check=True, capture_output=True)
    return python, root


def test_wheel_holds_the_kernels_and_the_card_template(wheel_venv):
    python, root = wheel_venv
    import zipfile
    names = zipfile.ZipFile(next((root / "dist").glob("*.whl"))).namelist()
    assert "hf_ptq_plugin/kernels/int4_gemm.py" in names
    assert any(n.startswith("hf_ptq_plugin/model_cards/") and n.endswith(".md") for n in names)
    assert not any(n.startswith("kernels/") for n in names)


@pytest.mark.parametrize("where", ["repository root", "elsewhere"])
def test_installed_wheel_imports_and_runs_the_cli(wheel_venv, where, tmp_path):
    python, root = wheel_venv
    # From the repository root the source tree's hf_ptq_plugin is first on sys.path with `-c`;
    # the wheel is what a user gets anywhere else, so "elsewhere" must load the installed copy.
    cwd = REPO if where == "repository root" else tmp_path
    found = _probe(python, cwd)
    assert _is_hugging_faces_kernels(found["kernels"]), found
    if where == "elsewhere":
        assert str(root / "venv") in found["plugin"] and str(root / "venv") in found["ours"]
    cli = root / "venv" / "bin" / "hf-ptq"
    out = subprocess.run([str(cli), "--help"], cwd=cwd, capture_output=True, text=True)
    assert out.returncode == 0 and "quantize" in out.stdout, out.stderr[-2000:]
