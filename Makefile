# megatron-moetion: set-up, demo, tests, patch checks. Variables can be overridden: make VENV=...
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PATCHED_MEGATRON ?= build/megatron-patched
MEGATRON_DIR ?=
PYTEST_ARGS ?=
DEMO_ARGS ?=

.PHONY: install patched-megatron check-patches apply-patches demo test test-extended test-unit lint bench \
        docker-lint clean help

help:
	@echo "make demo           CPU demo: Megatron pretrain() on a tiny MoE, a fault, bitwise check"
	@echo "make test           the whole test suite (CPU, gloo); what CI runs"
	@echo "make check-patches  apply the patch series to the pinned megatron-core wheel and check it"
	@echo "make apply-patches MEGATRON_DIR=...   patch your own Megatron-LM checkout"
	@echo "make bench          side-by-side benchmark (CPU), JSON + markdown + plots"
	@echo "make install        only create/refresh the virtual environment ($(VENV))"

install:
	@PYTHON=$(PYTHON) bash scripts/setup_venv.sh $(VENV)

patched-megatron: install
	@PYTHON=$(PY) bash scripts/check_patches.sh $(PATCHED_MEGATRON) > build-patched.log 2>&1 \
	  || { cat build-patched.log; exit 1; }
	@tail -n 1 build-patched.log && rm -f build-patched.log

check-patches: install
	PYTHON=$(PY) bash scripts/check_patches.sh

apply-patches:
	@test -n "$(MEGATRON_DIR)" || { echo "usage: make apply-patches MEGATRON_DIR=/path/to/Megatron-LM"; exit 2; }
	bash scripts/apply_patches.sh $(MEGATRON_DIR)

demo: patched-megatron
	$(PY) -m megatron_moetion.demo $(DEMO_ARGS)

lint: install
	$(VENV)/bin/ruff check megatron_moetion tests
	$(VENV)/bin/shellcheck scripts/*.sh .ci/run
	$(VENV)/bin/hadolint Dockerfile

test: patched-megatron lint
	$(PY) -m pytest --durations=15 $(PYTEST_ARGS)

test-extended: patched-megatron
	$(PY) -m pytest --durations=15 -m extended $(PYTEST_ARGS)

test-unit: install
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

bench: patched-megatron
	$(PY) -m megatron_moetion.bench

docker-lint: install
	$(VENV)/bin/hadolint Dockerfile

clean:
	rm -rf build runs .pytest_cache
