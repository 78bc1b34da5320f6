# One command sets up and runs the demo (`make run`), one runs the tests (`make test`).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PROTOS := $(wildcard protos/swarm/v1/*.proto)
GEN_STAMP := gen/swarm/v1/.generated
NODE_STAMP := clients/node/node_modules/.installed

.PHONY: install protos run test lint clean bench soak postgres

install: $(STAMP) $(GEN_STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	mkdir -p gen/swarm/v1
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

# Generated code is not committed: it is made here from protos/, the only source of truth.
protos $(GEN_STAMP): $(STAMP) $(PROTOS)
	rm -rf gen/swarm && mkdir -p gen/swarm/v1
	$(BIN)/python -m grpc_tools.protoc -Iprotos --plugin=protoc-gen-mypy=$(BIN)/protoc-gen-mypy \
		--plugin=protoc-gen-mypy_grpc=$(BIN)/protoc-gen-mypy_grpc --python_out=gen --grpc_python_out=gen \
		--mypy_out=gen --mypy_grpc_out=gen $(PROTOS)
	touch gen/swarm/__init__.py gen/swarm/v1/__init__.py gen/swarm/py.typed $(GEN_STAMP)

# The Node.js client and the buf CLI (used by the tests) come from the npm registry.
$(NODE_STAMP): clients/node/package.json clients/node/package-lock.json
	cd clients/node && npm ci --no-audit --no-fund --loglevel=error
	touch $@

# The web console's browser tests drive Debian's chromium (tests/test_web_console.py). It is
# installed here where it is missing and apt-get may; elsewhere those tests fail and say so.
CHROMIUM := /usr/bin/chromium
$(CHROMIUM):
	-apt-get update -qq && apt-get install -y -qq chromium

# The PostgreSQL store's tests and benchmark run Debian's server (fakes/postgres.py), installed here
# where it is missing (psql alone, from postgresql-client, is not the server). CI must run those
# tests, so `make test` stops at once when the server cannot be installed, and says why.
POSTGRES_SERVER = $(wildcard /usr/lib/postgresql/*/bin/postgres)
postgres:
	@test -n "$(POSTGRES_SERVER)" || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql; } || \
	{ echo "make: the PostgreSQL server is missing and apt-get could not install it: run 'apt-get install -y postgresql' as root" >&2; exit 1; }

# tests/test_metrics.py scrapes the services with Debian's Prometheus server, installed here the same
# way where it is missing; elsewhere those tests fail and say what to install.
PROMETHEUS := /usr/bin/prometheus
$(PROMETHEUS):
	-apt-get update -qq && apt-get install -y -qq --no-install-recommends prometheus

run: install
	$(BIN)/swarm up --workers 3 --demo --stay

# Independent test files run side by side on a fixed number of workers (most of their time is spent
# waiting on services, not computing); then the `serial` ones, which hold a system to a time bound,
# run alone. Both parts always run, and either failing fails the target.
TEST_WORKERS ?= 4
test: install $(NODE_STAMP) $(CHROMIUM) $(PROMETHEUS) postgres
	$(BIN)/pytest -q -n $(TEST_WORKERS) --dist loadfile -m "not serial"; parallel=$$?; \
	$(BIN)/pytest -q -m serial; serial=$$?; \
	test $$parallel -eq 0 -a $$serial -eq 0

# Measurements, not tests: a table and bench/results.json. The optional extra brings Ray (the peer
# in 1g) and py-spy; without it (say, no registry) that benchmark reports itself unavailable.
bench: install
	-$(MAKE) --no-print-directory postgres
	-$(BIN)/pip install --quiet -e '.[bench]'
	$(BIN)/python -m bench

# The chaos soak: ten minutes of load and random faults on a real stack, then every swarm checked
# (a table, and bench/soak-results.json). The test suite runs a short one.
SOAK_SECONDS ?= 600
soak: install
	$(BIN)/python -m soak --duration $(SOAK_SECONDS)

lint: install $(NODE_STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	clients/node/node_modules/.bin/buf lint

clean:
	rm -rf $(VENV) gen clients/node/node_modules
