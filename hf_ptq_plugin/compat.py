"""The transformers versions this package was tested with, and a warning outside them.

The plugin hooks into transformers' quantizer internals, which change between releases, so its
declared dependency range (in the installed package metadata, from pyproject.toml) ends at the newest
transformers release the test suite passed on. pip can still end up outside it (a later
`pip install -U transformers`); then importing the plugin warns, once, naming the range.
"""

import importlib.metadata
import warnings

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version


class UntestedTransformersWarning(UserWarning):
    """transformers is outside the range the plugin was tested with."""


def transformers_tested_range():
    """The transformers specifier of the installed plugin's metadata ('' when not installed)."""
    try:
        requirements = importlib.metadata.requires("hf-ptq-plugin") or []
    except importlib.metadata.PackageNotFoundError:
        return ""
    for line in requirements:
        requirement = Requirement(line)
        if requirement.name == "transformers" and requirement.marker is None:
            return str(requirement.specifier)
    return ""


def warn_if_untested(transformers_version, tested_range):
    """Warn when `transformers_version` lies outside `tested_range` (a PEP 440 specifier)."""
    if not tested_range:
        return
    if not SpecifierSet(tested_range).contains(Version(transformers_version), prereleases=True):
        warnings.warn(f"hf-ptq-plugin was tested with transformers {tested_range}; transformers "
                      f"{transformers_version} is installed. Quantized loading and saving may fail; install "
                      f"a tested version (pip install 'transformers{tested_range}').",
                      UntestedTransformersWarning, stacklevel=3)
