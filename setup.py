"""Only what pyproject.toml cannot say: a regular install also puts `hf_ptq_plugin_autoload.pth` in
site-packages, the startup hook that loads our checkpoints without `import hf_ptq_plugin`
(hf_ptq_plugin_autoload.py says how). Everything else is in pyproject.toml."""

import os

from setuptools import setup
from setuptools.command.build_py import build_py

PTH_NAME = "hf_ptq_plugin_autoload.pth"
PTH_LINE = "import hf_ptq_plugin_autoload\n"  # a .pth line starting with "import" runs at interpreter start


class BuildPyWithStartupHook(build_py):
    """build_py, plus the .pth file at the top of the wheel (site-packages once installed)."""

    def run(self):
        super().run()
        if not self.editable_mode:  # an editable install maps sources only: no .pth of ours (see the hook's docs)
            with open(os.path.join(self.build_lib, PTH_NAME), "w", encoding="utf-8") as pth:
                pth.write(PTH_LINE)

    def get_outputs(self, include_bytecode=True):
        outputs = super().get_outputs(include_bytecode)
        return outputs if self.editable_mode else [*outputs, os.path.join(self.build_lib, PTH_NAME)]


setup(cmdclass={"build_py": BuildPyWithStartupHook})
