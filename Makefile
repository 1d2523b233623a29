# Two entry points, each does its own set-up on a fresh machine:
#   make demo   quantize SmolLM2-135M with several formats and print a perplexity table
#   make test   run the test suite
# torch is installed first and pinned: 2.13.0 is the CPU build on this machine's disk; an
# unpinned torch would pull a multi-GB CUDA build.

VENV := .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test clean

$(STAMP): pyproject.toml
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install --quiet torch==2.13.0
	$(PYTHON) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(PYTHON) benchmarks/demo_perplexity.py

test: $(STAMP)
	$(PYTHON) -m pytest -q tests

clean:
	rm -rf $(VENV) build *.egg-info
