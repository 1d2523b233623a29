# Two entry points, each does its own set-up on a fresh machine:
#   make demo   quantize SmolLM2-135M with several formats and print a perplexity table, then
#               the same through the `hf-ptq` command line (quantize, export, eval)
#   make test   lint (ruff) and run the test suite
# Both install the exact versions of requirements-lock.txt into .venv. torch comes first, pinned:
# 2.13.0 is the CPU build on this machine's disk; an unpinned torch would pull a multi-GB CUDA build.
#   make test-latest   the suite on the newest releases the ranges of pyproject.toml allow, and the
#                      newest transformers even past its tested upper bound (torch stays 2.13.0), in
#                      .venv-latest: how the next transformers release is caught on purpose
#   make lock          write requirements-lock.txt from .venv-latest, after test-latest passed

VENV := .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.installed
LOCK := requirements-lock.txt
LATEST := .venv-latest
DEMO_CACHE := $(HOME)/.cache/hf_ptq_plugin

.PHONY: demo test test-latest lock clean

$(STAMP): pyproject.toml $(LOCK)
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet -c $(LOCK) pip setuptools
	$(PYTHON) -m pip install --quiet -c $(LOCK) torch
	$(PYTHON) -m pip install --quiet -c $(LOCK) --no-build-isolation -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(PYTHON) benchmarks/demo_perplexity.py
	@# The same model through the command line: fp8 (max: the fast algorithm) calibrated on 16 samples, exported,
	@# evaluated.
	set -e; set -- $$($(PYTHON) benchmarks/demo_paths.py --cache-dir $(DEMO_CACHE)); \
	$(VENV)/bin/hf-ptq quantize "$$1" --qformat fp8 --algorithm max --dtype "$$4" --dataset "$$2" --calib_size 16 \
		--calib_seq 256 \
		--export_path $(DEMO_CACHE)/smollm2-135m-fp8; \
	$(VENV)/bin/hf-ptq eval $(DEMO_CACHE)/smollm2-135m-fp8 --text "$$3" --seq_len 256 --windows 8 --baseline "$$1" \
		--dtype "$$4"

test: $(STAMP)
	$(PYTHON) -m ruff check .
	$(PYTHON) -m pytest -q tests

test-latest:
	rm -rf $(LATEST)
	python3 -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install --quiet --upgrade pip setuptools
	$(LATEST)/bin/python -m pip install --quiet torch==2.13.0
	$(LATEST)/bin/python -m pip install --quiet --no-build-isolation -e ".[dev]"
	$(LATEST)/bin/python -m pip install --quiet --upgrade transformers
	$(LATEST)/bin/python -m pip list --format=freeze | grep -iE '^(transformers|accelerate|peft|kernels)=='
	$(LATEST)/bin/python -m ruff check .
	$(LATEST)/bin/python -m pytest -q tests

lock:
	test -x $(LATEST)/bin/python || { echo "run make test-latest first"; exit 1; }
	{ sed -n '1,/^[^#]/{/^#/p}' $(LOCK); \
	  $(LATEST)/bin/python -m pip freeze --all --exclude-editable | sed 's/^torch==\([0-9.]*\)+cpu$$/torch==\1/' \
	  | sort -f; } > $(LOCK).tmp
	mv $(LOCK).tmp $(LOCK)

clean:
	rm -rf $(VENV) $(LATEST) build *.egg-info
