# The two set-up commands of the README:  `make run`  and  `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
SHELL := /bin/bash

.PHONY: run generate test test-slow clean

$(VENV)/.ok-run: pyproject.toml scripts/setup.sh
	bash scripts/setup.sh $(VENV) serve,sim
	touch $@

$(VENV)/.ok-test: pyproject.toml scripts/setup.sh scripts/install_browser.sh
	bash scripts/setup.sh $(VENV) serve,sim,test
	bash scripts/install_browser.sh $(VENV)
	touch $(VENV)/.ok-run $@

# Main job on the built-in default model: a completion generated through a 2-stage pipeline (checked
# against the single-process oracle), then the chat server on the same model (prints its URL).
run: $(VENV)/.ok-run
	$(VENV)/bin/flexpipe generate --stages 2 --max-tokens 24 --check "FlexPipe reshapes pipelines"
	$(VENV)/bin/flexpipe serve --stages 2

# Only the completion, no server.
generate: $(VENV)/.ok-run
	$(VENV)/bin/flexpipe generate --stages 2 --max-tokens 24 --check "FlexPipe reshapes pipelines"

# Everything the tests need, then the whole (non-slow) suite.
test: $(VENV)/.ok-test
	$(PY) -m pytest -q -m "not slow" -p no:cacheprovider

test-slow: $(VENV)/.ok-test
	$(PY) -m pytest -q -m slow -p no:cacheprovider || [ $$? -eq 5 ]  # 5: no slow case selected

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
