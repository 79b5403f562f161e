# Set-up is part of every target: a fresh machine needs nothing but Python 3.10+.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: venv demo test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build.
	$(PIP) install torch==2.13.0
	$(PIP) install -e ".[test]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	# overwrite=true: `make demo` may be run again; it owns runs/demo/
	OMP_NUM_THREADS=1 $(VENV)/bin/lightning-attr-train experiment=demo hydra.run.dir=runs/demo callbacks.attribution.overwrite=true
	OMP_NUM_THREADS=1 $(VENV)/bin/lightning-attr-attribute run_dir=runs/demo

# Two workers with one thread each: the tests run many small vmapped products, for which torch's
# intra-op threads only add overhead on a 2-core machine.
test: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 --durations=15 tests

bench: $(STAMP)
	$(PIP) install -e ".[test,bench]"
	# kronfluence without its dependencies: they pull torchvision and, with it, a multi-GB CUDA torch.
	# Its real dependencies (accelerate, einops, einconv, opt-einsum) come with the [bench] extra.
	$(PIP) install --no-deps kronfluence
	$(PY) benchmarks/bench.py --out benchmarks/results/latest.json

clean:
	rm -rf $(VENV) runs build *.egg-info
