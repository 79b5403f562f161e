# Set-up is part of every target: a fresh machine needs nothing but Python 3.10+.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
PEERS_STAMP := $(VENV)/.peers-installed

.PHONY: venv demo test test-peers examples bench clean

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

# The peers (dattri, traker, kronfluence) next to the test set-up.
$(PEERS_STAMP): $(STAMP)
	$(PIP) install -e ".[test,bench]"
	# kronfluence without its dependencies: they pull torchvision and, with it, a multi-GB CUDA torch.
	# Its real dependencies (accelerate, einops, einconv, opt-einsum) come with the [bench] extra.
	$(PIP) install --no-deps kronfluence
	touch $(PEERS_STAMP)

# The tests that compare with the peers; `make test` skips them where the peers are not installed.
# Here they must run: LIGHTNING_ATTR_REQUIRE_PEERS=1 turns a missing peer into a failure.
test-peers: $(PEERS_STAMP)
	LIGHTNING_ATTR_REQUIRE_PEERS=1 OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 tests/test_evaluation_peers.py tests/test_evaluation_metrics.py

# examples/: each asserts what it shows; they run in runs/examples/ (replaced on every run).
EXAMPLES := quickstart own_module_predict grouped_sources mislabel_detection
examples: $(STAMP)
	rm -rf runs/examples && mkdir -p runs/examples
	set -e; cd runs/examples && for name in $(EXAMPLES); do \
		echo "== examples/$$name.py"; OMP_NUM_THREADS=1 $(abspath $(PY)) ../../examples/$$name.py; done
	echo "== examples/hydra_project/train.py"
	cd runs/examples && OMP_NUM_THREADS=1 $(abspath $(PY)) ../../examples/hydra_project/train.py hydra.run.dir=hydra_project
	echo "== examples/stdlib_lm.py --fast" && cd runs/examples && OMP_NUM_THREADS=1 $(abspath $(PY)) ../../examples/stdlib_lm.py --fast

bench: $(PEERS_STAMP)
	$(PY) benchmarks/bench.py --out benchmarks/results/latest.json

clean:
	rm -rf $(VENV) runs build *.egg-info
