# evl-nb: one command sets up a fresh machine and runs everything CI runs.
#   make test   create .venv if missing, install -e .[dev], nbdev_export (must change nothing), nbdev_test with the
#               `#| slow` cells, every pytest tier (what CI runs)
#   make test-fast   the inner loop: export check + pytest without the slow, demo, browser and cuda tiers (pytest.ini)
#   (the `#| cuda` cells and the cuda tests run on a GPU in benchmarks/gpu_check.sh)
#   make demo   train on the generated synthetic dataset on CPU, then evaluate
VENV      ?= .venv
PYTHON    ?= python3
# torch is installed first so pip does not pick a build for you; override for your machine,
# e.g. make test TORCH_SPEC="torch torchvision --index-url https://download.pytorch.org/whl/cpu"
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
BIN        = $(VENV)/bin
STAMP      = $(VENV)/.evl-nb-installed

.PHONY: install export-check nbtest pytest test test-fast demo clean

$(STAMP): setup.py settings.ini
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch, torchvision" 2>/dev/null || $(BIN)/python -m pip install -q $(TORCH_SPEC) 2>&1 | grep -v 'is ignored' || true
	$(BIN)/python -m pip install -q -e '.[dev]' 2>&1 | grep -v 'is ignored' || true
	$(BIN)/python -c "import torch, evl_nb, nbdev, papermill, decord, av, open_clip"
	touch $(STAMP)

install: $(STAMP)

export-check: install
	$(BIN)/nbdev_export
	@changed="$$(git status --porcelain -- evl_nb)"; if [ -n "$$changed" ]; then \
	  echo "nbdev_export changed evl_nb/ (notebooks and library out of sync; export and commit both):"; \
	  echo "$$changed"; git --no-pager diff --stat -- evl_nb; exit 1; fi; echo "nbdev_export: evl_nb/ in sync"

nbtest: install
	$(BIN)/nbdev_test --n_workers 2 --timing --flags slow

pytest: install
	$(BIN)/python -m pytest tests -ra --durations=20

test-fast: export-check
	$(BIN)/python -m pytest tests -ra -m 'not slow and not demo and not browser and not cuda' --durations=10

test: export-check nbtest pytest

demo: install
	$(BIN)/python -m evl_nb.demo

clean:
	rm -rf outputs runs _proc
