# Each target sets up .venv itself on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint bench fuzz openapi screenshots clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

run: $(STAMP)
	@echo "webhookd: the API is on 127.0.0.1:8787. For the CLI, in another terminal here:"
	@echo "  . .venv/bin/activate && export WEBHOOKD_CONFIG=\$$PWD/config.example.toml"
	$(BIN)/webhookd run -c config.example.toml

lint: $(STAMP)
	$(BIN)/ruff check daemon tests bench examples
	$(BIN)/ruff format --check daemon tests bench examples
	$(BIN)/mypy

test: lint
	$(BIN)/pytest -q

# The cluster crash oracle for minutes rather than seconds (a new seed each run; replay
# one with WEBHOOKD_CRASH_SEED=<seed>), then Schemathesis against a live daemon with many
# more examples per operation than `make test` runs.
fuzz: $(STAMP)
	WEBHOOKD_CRASH_SECONDS=$${WEBHOOKD_CRASH_SECONDS:-300} WEBHOOKD_TEST_DEADLINE_S=900 \
		$(BIN)/pytest -q -s -p no:cacheprovider tests/test_cluster_crash.py
	WEBHOOKD_SCHEMATHESIS_EXAMPLES=$${WEBHOOKD_SCHEMATHESIS_EXAMPLES:-500} \
		WEBHOOKD_TEST_DEADLINE_S=1800 \
		$(BIN)/pytest -q -p no:cacheprovider tests/test_openapi.py

# docs/openapi.yaml is the document's source; the daemon serves this JSON copy of it, shipped
# inside the package (no YAML parser at run time). tests/test_openapi.py checks they agree.
openapi: $(STAMP)
	$(BIN)/python -c 'import json, sys, yaml; \
		document = yaml.safe_load(open("docs/openapi.yaml", encoding="utf-8")); \
		text = json.dumps(document, indent=1, ensure_ascii=False) + "\n"; \
		open("daemon/webhookd/openapi.json", "w", encoding="utf-8").write(text)'

bench: $(STAMP)
	$(BIN)/python -m bench $(ARGS)

# PNGs of the pages (overview, a stalled tenant, a portal page; 1280 and 390 px wide) from
# Debian's chromium, as the browser tests see them: the README shows them.
screenshots: $(STAMP)
	WEBHOOKD_SCREENSHOTS=$(CURDIR)/docs/screenshots $(BIN)/pytest -q -p no:cacheprovider \
		tests/test_ui_browser.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
