"""Load hf-ptq-plugin checkpoints without `import hf_ptq_plugin`: the startup hook of a pip install.

A checkpoint of ours says quant_method "modelopt" in its config.json. Without our quantizer
registered, transformers only warns and loads the FP8 or INT8 codes as plain weights: a model that
runs and outputs garbage. A regular install therefore ships `hf_ptq_plugin_autoload.pth`, whose one
line imports this module at interpreter start. It costs nothing there: it imports nothing (not
transformers, not torch) and adds one import finder. When transformers' quantizer registry
(`transformers.quantizers.auto`) is imported, the finder lets it load, then makes its two
"quant_method -> class" tables import hf_ptq_plugin (which registers itself in them) the first
time anyone looks up "modelopt" there. By then transformers is fully imported, so the plugin's own
imports of it cannot be circular, and a process that never loads such a checkpoint never imports
the plugin.

HF_PTQ_PLUGIN_AUTOLOAD=0 turns the hook off. Editable installs (`pip install -e`) do not install the
.pth file: import hf_ptq_plugin there.
"""

import os
import sys

REGISTRY_MODULE = "transformers.quantizers.auto"
TABLES = ("AUTO_QUANTIZATION_CONFIG_MAPPING", "AUTO_QUANTIZER_MAPPING")
QUANT_METHOD = "modelopt"  # PTQConfig.quant_method, spelled out: this module must not import the plugin


class PluginOnLookup(dict):
    """A transformers registry table that imports hf_ptq_plugin on the first lookup of "modelopt"."""

    def __contains__(self, key):
        _import_plugin_for(key)
        return dict.__contains__(self, key)

    def __getitem__(self, key):
        _import_plugin_for(key)
        return dict.__getitem__(self, key)


_state = {"imported": False}


def _import_plugin_for(key) -> None:
    if key != QUANT_METHOD or _state["imported"]:
        return
    _state["imported"] = True  # first: the plugin's registration looks the key up again
    import hf_ptq_plugin  # noqa: F401  (registers its quantizer in these very tables)


class _RegistryFinder:
    """Finds nothing itself: when the registry module is imported, wraps its loader (below)."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != REGISTRY_MODULE:
            return None
        from importlib.machinery import PathFinder

        spec = PathFinder.find_spec(fullname, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _TablesAfterExec(spec.loader)
        return spec


class _TablesAfterExec:
    """The registry module's loader, which swaps its tables for `PluginOnLookup` ones after running it."""

    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        for name in TABLES:
            table = getattr(module, name, None)
            if isinstance(table, dict) and not isinstance(table, PluginOnLookup):
                setattr(module, name, PluginOnLookup(table))

    def __getattr__(self, name):  # get_source, is_package, ... as the real loader has them
        return getattr(self.loader, name)


def install() -> None:
    """Add the finder once, unless HF_PTQ_PLUGIN_AUTOLOAD=0 or the registry is already imported."""
    if os.environ.get("HF_PTQ_PLUGIN_AUTOLOAD", "1") == "0" or REGISTRY_MODULE in sys.modules:
        return
    if not any(isinstance(finder, _RegistryFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RegistryFinder())


install()
