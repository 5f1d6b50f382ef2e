# Everything from nothing into .venv. On the CPU-only dev/CI machines torch is pinned to the local
# CPU wheel (a bare `torch` requirement would pull gigabytes of CUDA packages).
PY        ?= python3
VENV      := .venv
BIN       := $(VENV)/bin
TORCH_PIN ?= torch==2.13.0
STAMP     := $(VENV)/.installed

.PHONY: install demo test lint paper tables clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH_PIN)
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# The default experiment: FP / W8A8 / W4A16 / W4A8 / W4A4KV4 (RTN and GPTQ) on the shipped reference model.
demo: $(STAMP)
	$(BIN)/python experiments/run.py -m +experiment=demo results_dir=results progress=false
	$(BIN)/python scripts/make_tables.py results/demo

test: $(STAMP)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline $(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check spinquant qat experiments scripts tests examples

# Regenerate every table and figure in paper/ (and the tables spliced into README.md) from the committed rows.
paper: $(STAMP)
	$(BIN)/python scripts/make_paper.py

tables: paper

clean:
	rm -rf $(VENV) results outputs multirun
