# Two entry points, each does its own set-up on a fresh machine:
#   make demo   quantize SmolLM2-135M with several formats and print a perplexity table, then
#               the same through the `hf-ptq` command line (quantize, export, eval)
#   make test   run the test suite
# torch is installed first and pinned: 2.13.0 is the CPU build on this machine's disk; an
# unpinned torch would pull a multi-GB CUDA build.

VENV := .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_CACHE := $(HOME)/.cache/hf_ptq_plugin

.PHONY: demo test clean

$(STAMP): pyproject.toml
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install --quiet torch==2.13.0
	$(PYTHON) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(PYTHON) benchmarks/demo_perplexity.py
	@# The same model through the command line: fp8 calibrated on 16 samples, exported, evaluated.
	set -e; set -- $$($(PYTHON) benchmarks/demo_paths.py --cache-dir $(DEMO_CACHE)); \
	$(VENV)/bin/hf-ptq quantize "$$1" --qformat fp8 --dtype float32 --dataset "$$2" --calib_size 16 --calib_seq 256 \
		--export_path $(DEMO_CACHE)/smollm2-135m-fp8; \
	$(VENV)/bin/hf-ptq eval $(DEMO_CACHE)/smollm2-135m-fp8 --text "$$3" --seq_len 256 --windows 8 --baseline "$$1" \
		--dtype float32

test: $(STAMP)
	$(PYTHON) -m pytest -q tests

clean:
	rm -rf $(VENV) build *.egg-info
