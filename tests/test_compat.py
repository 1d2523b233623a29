"""The tested transformers range comes from the installed metadata; outside it, import warns once."""

import subprocess
import sys
import warnings

import pytest

from hf_ptq_plugin.compat import UntestedTransformersWarning, transformers_tested_range, warn_if_untested


def test_tested_range_is_read_from_the_installed_metadata_and_holds_the_running_transformers():
    import transformers

    tested = transformers_tested_range()
    assert tested.startswith(">=") or "<=" in tested, tested
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_if_untested(transformers.__version__, tested)  # the locked version is inside: no warning


@pytest.mark.parametrize("version", ["5.0.0", "9.0.0", "5.26.0.dev0"])
def test_versions_outside_the_range_warn_naming_it(version):
    with pytest.warns(UntestedTransformersWarning, match=r"tested with transformers <=5\.25\.0,>=5\.16") as caught:
        warn_if_untested(version, "<=5.25.0,>=5.16")
    assert version in str(caught[0].message)


def test_import_warns_once_under_an_untested_transformers():
    probe = ("import warnings, transformers; transformers.__version__ = '99.0.0'; "
             "warnings.simplefilter('always');\n"
             "with warnings.catch_warnings(record=True) as seen:\n"
             "    import hf_ptq_plugin, hf_ptq_plugin.config\n"
             "print(sum('tested with transformers' in str(w.message) for w in seen))")
    out = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True)
    assert out.stdout.strip() == "1"
