# Everything a fresh machine needs: `make test` and `make demo` create .venv and install on first use.
# torch 2.13.0 is installed first (pip finds the CPU build on this machine's disk); the package's torch range
# admits it, so nothing pulls a multi-GB CUDA build. DeepSpeed builds from source with its CUDA ops off.

PY     ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
EXTRAS ?= dev,triton,train,hf,quant

.PHONY: install test test-fast demo lint bench bench-quick quality quality-quick clean

$(STAMP): pyproject.toml Makefile
	@echo "==> [1/4] virtual environment $(VENV)"
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	@echo "==> [2/4] pip"
	$(BIN)/python -m pip install --progress-bar on --upgrade pip
	@echo "==> [3/4] torch 2.13.0 (the CPU build; a few minutes on a fresh machine)"
	$(BIN)/python -m pip install --progress-bar on torch==2.13.0
	@echo "==> [4/4] moe-lora with the extras $(EXTRAS) (DeepSpeed builds from source with its CUDA ops off)"
	DS_BUILD_OPS=0 $(BIN)/python -m pip install --progress-bar on -e ".[$(EXTRAS)]"
	touch $(STAMP)
	@echo "==> installed: $(BIN)/moe-lora"

install: $(STAMP)  ## create .venv and install the package with all CPU extras

test: $(STAMP)  ## the whole suite (GPU tests skip without CUDA)
	$(BIN)/python -m pytest

test-fast: $(STAMP)  ## the suite without the slow tests
	$(BIN)/python -m pytest -m "not slow"

demo: $(STAMP)  ## MoE-LoRA vs LoRA vs head-only on the pretrained MiniLM, conflicting tasks, router report (runs/demo)
	$(BIN)/moe-lora demo

lint: $(STAMP)  ## ruff format --check and ruff check (CI runs both)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

bench: $(STAMP)  ## the README's performance tables: end-to-end step, scaling sweep and plot, one layer (~10 min)
	$(BIN)/python benchmarks/e2e.py --readme README.md
	$(BIN)/python benchmarks/scaling.py
	$(BIN)/python benchmarks/layer.py

bench-quick: $(STAMP)  ## smoke run of the three benchmarks (results in runs/bench-quick, not the README's)
	$(BIN)/python benchmarks/e2e.py --quick --out runs/bench-quick/e2e.json
	$(BIN)/python benchmarks/scaling.py --quick --out runs/bench-quick/scaling.json
	$(BIN)/python benchmarks/layer.py --quick --out runs/bench-quick/layer.json

quality: $(STAMP)  ## offline multi-task quality experiment, 13 methods x 5 seeds; rewrites the README table (~1 h on 2 CPU cores)
	$(BIN)/python benchmarks/quality/run.py --readme README.md

quality-quick: $(STAMP)
	$(BIN)/python benchmarks/quality/run.py --quick

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
