# One entry point for people and CI. `make demo` and `make test` are the two
# commands the README starts with; .ci/run calls `make test`.
VENV ?= .venv
BIN := $(VENV)/bin
OIDC := tests/interop/oidc
NODE_CONSUMER := tests/interop/node_consumer

.PHONY: install demo run test lint typecheck unit node-deps deploy-check dashboards bench bench-quick clean

$(BIN)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[test]'
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/refreshd demo

run: install
	$(BIN)/refreshd run

# The oidc-provider interop peer and the node consumer need node; without it
# those tests skip and say why.
node-deps:
	@if command -v npm >/dev/null 2>&1; then \
		npm ci --prefix $(OIDC) --no-audit --no-fund --loglevel=error && \
		npm ci --prefix $(NODE_CONSUMER) --no-audit --no-fund --loglevel=error; \
	else echo "npm not found: the oidc-provider and node consumer tests will be skipped"; fi

lint: install
	$(BIN)/ruff check worker tests
	$(BIN)/ruff format --check worker tests

typecheck: install
	$(BIN)/mypy

unit: install
	$(BIN)/pytest

test: install node-deps lint typecheck unit

# refreshd against the do-it-yourself alternative (arq): one command, ~7 min
# on 2 cores; results (JSON, Markdown table, PNG) under bench/results/.
bench: install
	$(BIN)/pip install --quiet -c constraints.txt -e '.[bench]'
	$(BIN)/python -m bench --out bench/results/latest

# The same scenarios at small sizes, under a minute: CI runs it so the
# benchmark never rots (its figures are not the ones quoted).
bench-quick: install
	$(BIN)/pip install --quiet -c constraints.txt -e '.[bench]'
	$(BIN)/python -m bench --quick --out bench/results/quick

# Container, Kubernetes manifests, Prometheus rules and the Grafana dashboard,
# each checked by its own tools, then a real Prometheus scrapes a real worker.
deploy-check: install
	bash deploy/ci/check.sh

# Regenerate rules, PrometheusRule and dashboard after editing dashboards/generate.py.
dashboards: install
	$(BIN)/pip install --quiet -c constraints.txt -r deploy/ci/requirements.txt
	$(BIN)/python dashboards/generate.py

clean:
	rm -rf $(VENV) $(OIDC)/node_modules $(NODE_CONSUMER)/node_modules deploy/ci/node_modules .refreshd
