# The README's commands. Each creates .venv and installs what it needs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.rccs-installed
SOURCES := pyproject.toml setup.py $(wildcard rccs/_fastpath/*.pyx rccs/_fastpath/*.pxd)

.PHONY: serve test lint test-compiled test-pure bench bench-e2e wheel clean

$(STAMP): $(SOURCES)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

serve: $(STAMP)
	$(BIN)/rccs serve

lint: $(STAMP)
	$(BIN)/ruff check rccs tests benchmarks examples
	$(BIN)/mypy rccs

test-compiled: $(STAMP)
	RCCS_EXPECT_IMPLEMENTATION=cython $(BIN)/python -m pytest -q

test-pure: $(STAMP)
	RCCS_PUREPYTHON=1 RCCS_EXPECT_IMPLEMENTATION=python $(BIN)/python -m pytest -q

test: lint test-compiled test-pure

bench: $(STAMP)
	$(BIN)/python -m pytest benchmarks -q --benchmark-only --benchmark-columns=min,median,mean,ops,rounds \
		--benchmark-group-by=group --benchmark-sort=name

wheel: $(STAMP)
	$(BIN)/python -m pip wheel --no-deps -w dist .

clean:
	rm -rf $(VENV) build dist *.egg-info rccs/_fastpath/*.so rccs/_fastpath/_*.c
