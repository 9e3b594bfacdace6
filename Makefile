# The two set-up commands of the README: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test docs lint format clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, pinned: these wheels come from the local index; a newer torch is a multi-GB download.
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/llm-train demo

test: $(STAMP)
	VENV=$(VENV) bash tests/run_suite.sh

docs: $(STAMP)
	$(PY) -m launcher.config_reference

lint: $(STAMP)
	$(VENV)/bin/ruff check launcher trainer tests bench
	$(VENV)/bin/ruff format --check launcher trainer tests bench

format: $(STAMP)
	$(VENV)/bin/ruff format launcher trainer tests bench
	$(VENV)/bin/ruff check --fix launcher trainer tests bench

clean:
	rm -rf $(VENV) .pytest_cache
