# Set-up is idempotent: the venv and each install step are redone only when their inputs change.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP_BASE := $(VENV)/.installed-base
STAMP_TEST := $(VENV)/.installed-test

.PHONY: demo test setup setup-test bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP_BASE): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e .
	touch $@

# torchvision is only the image-preprocessing oracle; --no-deps keeps pip from replacing the CPU torch.
$(STAMP_TEST): $(STAMP_BASE) pyproject.toml
	$(PY) -m pip install --quiet -e '.[test]'
	$(PY) -m pip install --quiet --no-deps torchvision==0.28.0
	touch $@

setup: $(STAMP_BASE)
setup-test: $(STAMP_TEST)

demo: setup
	$(VENV)/bin/llama4 info --preset scout

test: setup-test
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
