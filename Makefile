# Two entry points: `make demo` (the main job on the embedded demo) and `make test` (the suite).
# Each creates .venv and installs what it needs on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TEST_ENV := XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

.PHONY: demo test test-real bench install clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 JAX_PLATFORMS=$${JAX_PLATFORMS:-cpu} bash scripts/demo.sh

# Two workers, one test file each at a time (module fixtures are built once): ~1.2x on 2 cores.
test: $(STAMP)
	$(TEST_ENV) $(PY) -m pytest tests -m "not real" -n 2 --dist loadfile

# The slow checks on the real SmolLM2-135M-Instruct model (built once under .cache/smollm2).
test-real: $(STAMP)
	$(TEST_ENV) $(PY) -m pytest tests -m real

bench: $(STAMP)
	$(PY) -m benchmarks.run_all

clean:
	rm -rf $(VENV) build runs *.egg-info
