# Everything from nothing into .venv. On the CPU-only dev/CI machines torch is pinned to the local
# CPU wheel (a bare `torch` requirement would pull gigabytes of CUDA packages).
PY        ?= python3
VENV      := .venv
BIN       := $(VENV)/bin
TORCH_PIN ?= torch==2.13.0
STAMP     := $(VENV)/.installed

.PHONY: install demo test lint tables clean

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
	$(BIN)/ruff check spinquant qat experiments scripts tests

# Re-render the committed tables from the committed rows.
tables: $(STAMP)
	$(BIN)/python scripts/make_tables.py paper/results/foundation --out paper/foundation_table.md \
		--splice README.md:foundation_table
	$(BIN)/python scripts/make_tables.py paper/results/rotation --layout rotation --out paper/rotation_table.md \
		--splice README.md:rotation_table
	$(BIN)/python scripts/make_tables.py paper/results/qat --layout qat --out paper/qat_table.md --splice README.md:qat_table
	$(BIN)/python scripts/bench_table.py --e2e paper/results/bench_e2e.json --kernels paper/results/bench_kernels.json \
		--out paper/bench_table.md --splice README.md:bench_table

clean:
	rm -rf $(VENV) results outputs multirun
