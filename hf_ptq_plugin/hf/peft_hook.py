"""Register QuantLinear's LoRA layer with PEFT when PEFT is imported, without importing it ourselves.

`import hf_ptq_plugin` must stay cheap and must not pull in PEFT (and whatever PEFT imports) for
users who never fine-tune. If PEFT is already imported, `hf/lora.py` registers at once; if it is
installed but not imported, a one-shot import hook runs the registration right after PEFT's own
package finishes importing (before any LoraConfig can exist); if it is not installed, nothing
happens.
"""

import importlib.abc
import importlib.util
import logging
import sys

logger = logging.getLogger(__name__)

PEFT = "peft"


def register_with_peft() -> str:
    """"registered" (PEFT was imported), "deferred" (until PEFT is imported) or "absent" (not installed)."""
    module = sys.modules.get(PEFT)
    if module is not None and not _initializing(module):
        _register()
        return "registered"
    if importlib.util.find_spec(PEFT) is None:
        return "absent"
    if not any(isinstance(finder, _AfterPeftImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _AfterPeftImport())
    return "deferred"


def _register() -> None:
    from .lora import register_lora_layer

    register_lora_layer()


def _initializing(module) -> bool:
    spec = getattr(module, "__spec__", None)
    return bool(getattr(spec, "_initializing", False))


class _AfterPeftImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: hands out PEFT's real spec with a loader that registers after loading.

    Stays installed until PEFT is actually loaded: `importlib.util.find_spec("peft")` probes (as
    transformers' `is_peft_available()` makes) also come here and must not use it up.
    """

    def find_spec(self, fullname, path=None, target=None):
        if fullname != PEFT:
            return None
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            spec = None if finder is self or find is None else find(fullname, path, target)
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _ThenRegister(spec.loader, self)
                return spec
        return None


class _ThenRegister(importlib.abc.Loader):
    """PEFT's own loader, followed by the registration; every other attribute is the original's."""

    def __init__(self, loader, finder: _AfterPeftImport):
        self.loader, self.finder = loader, finder

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        if self.finder in sys.meta_path:
            sys.meta_path.remove(self.finder)
        try:
            _register()
        except (ImportError, AttributeError) as error:  # a PEFT whose LoRA internals moved
            logger.warning("hf_ptq_plugin could not register its LoRA layer with this PEFT (%s); LoRA on "
                           "QuantLinear layers is unavailable", error)

    def __getattr__(self, name):
        return getattr(self.loader, name)
