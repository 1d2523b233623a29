"""Packaging: our kernels import as hf_ptq_plugin.kernels and never shadow Hugging Face's `kernels`;
the built wheel installs and works without the source tree."""

import json
import os
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


# Loads a checkpoint as a user who never imports hf_ptq_plugin does; reports what was imported when.
LOAD_WITHOUT_IMPORT = """
import json, sys
at_start = sorted(m for m in ("hf_ptq_plugin", "transformers", "torch") if m in sys.modules)
import torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
with torch.no_grad():
    torch.save(model(torch.arange(24)[None]).logits, sys.argv[2])
print(json.dumps({"at_start": at_start, "plugin_imported": "hf_ptq_plugin" in sys.modules}))
"""


@pytest.fixture(scope="module")
def fp8_checkpoint(tmp_path_factory):
    import torch
    from conftest import tiny_llama

    from hf_ptq_plugin import PTQConfig, quantize

    model, ids = tiny_llama(), torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(1))
    quantize(model, PTQConfig(qformat="fp8", algorithm="max"), forward_loop=lambda m: m(ids))
    path = tmp_path_factory.mktemp("fp8") / "checkpoint"
    model.save_pretrained(path)
    return path


@pytest.mark.parametrize("hook", ["on", "off"])
def test_installed_wheel_loads_our_checkpoint_without_the_import(wheel_venv, fp8_checkpoint, hook, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    python, _ = wheel_venv
    env = {**os.environ, "HF_PTQ_PLUGIN_AUTOLOAD": "1" if hook == "on" else "0"}
    out = subprocess.run([str(python), "-c", LOAD_WITHOUT_IMPORT, str(fp8_checkpoint), str(tmp_path / "logits.pt")],
                         cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["at_start"] == []  # the startup hook imports nothing: interpreter start costs the same
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(fp8_checkpoint)(torch.arange(24)[None]).logits
    logits = torch.load(tmp_path / "logits.pt")
    if hook == "on":  # the plugin came in with the checkpoint, and the model is the plugin's, bit for bit
        assert report["plugin_imported"]
        torch.testing.assert_close(logits, expected, rtol=0, atol=0)
    else:  # what the hook prevents: FP8 codes read as weights, with only transformers' warning
        assert not report["plugin_imported"] and "Unknown quantization type" in out.stderr
        assert not torch.allclose(logits, expected, atol=1e-2)
