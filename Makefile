# `make quickstart` and `make test` work on a fresh clone: they create .venv when missing.
VENV    ?= .venv
PYTHON  ?= python3
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.mmpo-installed
PIP     := $(PY) -m pip install --quiet --disable-pip-version-check

.PHONY: quickstart test test-fast install clean

$(STAMP): pyproject.toml setup.py
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) torch==2.14.1 torchvision==0.29.1
	$(PIP) -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)

quickstart: $(STAMP)
	$(VENV)/bin/mmpo train configs/quickstart.yaml

test: $(STAMP)
	OMP_NUM_THREADS=1 $(VENV)/bin/pytest -q

test-fast: $(STAMP)
	OMP_NUM_THREADS=1 $(VENV)/bin/pytest -q -m "not slow"

clean:
	rm -rf runs .pytest_cache
