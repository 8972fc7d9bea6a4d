# ebmad: `make demo` trains + evaluates on a synthetic category on CPU; `make test` runs the tests.
# Both create ./.venv on first use. GPU users: see docs/running-and-sweeps.md, Installation (TORCH_VERSION / an existing CUDA torch).
PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: install demo demo-compare test test-all lint format bench-bottle bench-models bench-predict clean

install: $(VENV)/.installed

# torch is installed first, pinned: on this machine the pin resolves to a local CPU wheel; on a CUDA
# machine `pip install torch==X` gets the CUDA build. The package itself only asks for torch>=2.1,
# so an already installed torch is never replaced.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "torch==$(TORCH_VERSION)"
	$(PY) -m pip install -q -e ".[dev,sweep,export]"
	touch $@

demo: install
	$(PY) -m ebmad.train experiment=quickstart

# the three methods (EBM, DRAEM, SSAE) side by side on the synthetic category, tiny CPU settings, then the report
# (report.md/.csv/.html in logs/compare_demo/sweeps/default; the last line names report.html)
demo-compare: install
	$(PY) -m ebmad.train experiment=compare_demo

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

test-all: install
	$(PY) -m pytest -m "" $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check ebmad tests experiments
	$(VENV)/bin/ruff format --check ebmad tests experiments

format: install
	$(VENV)/bin/ruff format ebmad tests experiments
	$(VENV)/bin/ruff check --fix ebmad tests experiments

bench-bottle: install
	$(PY) experiments/bench_bottle.py

bench-models: install
	$(PY) experiments/bench_models.py

bench-predict: install
	$(PY) experiments/bench_predict.py

clean:
	rm -rf $(VENV) logs .pytest_cache
