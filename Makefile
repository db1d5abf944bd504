# One entry point for people and CI. `make demo` and `make test` are the two
# commands the README starts with; .ci/run calls `make test`.
VENV ?= .venv
BIN := $(VENV)/bin
OIDC := tests/interop/oidc

.PHONY: install demo run test lint typecheck unit node-deps bench-quick clean

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

# The oidc-provider interop peer needs node; without it those tests skip and say why.
node-deps:
	@if command -v npm >/dev/null 2>&1; then \
		npm ci --prefix $(OIDC) --no-audit --no-fund --loglevel=error; \
	else echo "npm not found: the oidc-provider interop tests will be skipped"; fi

lint: install
	$(BIN)/ruff check worker tests
	$(BIN)/ruff format --check worker tests

typecheck: install
	$(BIN)/mypy

unit: install
	$(BIN)/pytest

test: install node-deps lint typecheck unit

clean:
	rm -rf $(VENV) $(OIDC)/node_modules .refreshd
