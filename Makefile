# Set-up is idempotent: the venv and each install step are redone only when their inputs change.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP_BASE := $(VENV)/.installed-base
STAMP_TEST := $(VENV)/.installed-test

.PHONY: demo test lint test-cpu-paths setup setup-test bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP_BASE): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[serve]'
	touch $@

# torchvision is only the image-preprocessing oracle; --no-deps keeps pip from replacing the CPU torch.
# Headless Chromium for tests/serve/test_browser.py: Debian's chromium + chromium-driver, installed with
# apt-get only when missing and apt-get can run (root or passwordless sudo); otherwise one line says so and
# the set-up goes on (the browser test then skips, saying why). apt's output goes to .venv/apt-browser.log.
$(STAMP_TEST): $(STAMP_BASE) pyproject.toml
	$(PY) -m pip install --quiet -e '.[test]'
	$(PY) -m pip install --quiet --no-deps torchvision==0.28.0
	@if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then :; \
	elif ! command -v apt-get >/dev/null 2>&1; then \
	  echo "setup-test: chromium/chromedriver not installed and no apt-get here: the browser test will be skipped"; \
	else \
	  if [ "$$(id -u)" = 0 ]; then as=; \
	  elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then as="sudo -n"; \
	  else as=none; fi; \
	  if [ "$$as" = none ]; then \
	    echo "setup-test: chromium/chromedriver not installed and apt-get needs root or passwordless sudo: the browser test will be skipped"; \
	  elif { $$as apt-get update -q && $$as env DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
	         --no-install-recommends chromium chromium-driver; } >$(VENV)/apt-browser.log 2>&1; then \
	    echo "setup-test: installed chromium and chromium-driver with apt-get"; \
	  else \
	    echo "setup-test: apt-get could not install chromium/chromium-driver (see $(VENV)/apt-browser.log): the browser test will be skipped"; \
	  fi; \
	fi
	touch $@

setup: $(STAMP_BASE)
setup-test: $(STAMP_TEST)

demo: setup
	$(VENV)/bin/llama4 demo

# ruff (config in pyproject.toml) first: a lint error fails the run before the suite starts
lint: setup-test
	$(VENV)/bin/ruff check src tests bench

test: lint
	$(PY) -m pytest -q

# The model, generation, serving and kernel tests again on the paths of CPUs other than this one, whatever
# this one is: oneDNN capped at AVX2 with the AVX2 kernel (every x86-64 CPU of the last decade), and oneDNN
# capped at AVX-512 BF16 (AMD EPYC) with no C kernel and no C layer (no compiler, or the kernel switched off).
CPU_PATH_TESTS := tests/model tests/inference tests/serve tests/kernels
# the HTTP-level serve tests (request checks, browser guard, remote images, tool-call text, real clients,
# shutdown, fuzzing) run the model no differently on another CPU path: make test runs them once
CPU_PATH_IGNORE := $(addprefix --ignore=tests/serve/,test_fuzz.py test_hostile.py test_browser_guard.py \
	test_remote_images.py test_tool_stream.py test_real_clients.py test_shutdown.py)
test-cpu-paths: setup-test
	ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 LLAMA4_CPU_KERNEL=avx2 $(PY) -m pytest -q $(CPU_PATH_TESTS) $(CPU_PATH_IGNORE)
	ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16 LLAMA4_CPU_KERNEL=off LLAMA4_FUSED_DECODE=0 $(PY) -m pytest -q $(CPU_PATH_TESTS) $(CPU_PATH_IGNORE)

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
