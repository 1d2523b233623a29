"""`python -m hf_ptq_plugin ...`: the same as the `hf-ptq` command (`cli/`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
