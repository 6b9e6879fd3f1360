# Two commands on a fresh clone: `make demo` runs the main job, `make test` runs the tests.
# Both create .venv and install the project (with its test extras) on first use.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast install clean-runs

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -c constraints.txt -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) jobs/demo.py --config configs/demo.yaml

test: $(STAMP)
	$(PY) -m pytest

# Everything except the Ray tests: about a minute.
test-fast: $(STAMP)
	$(PY) -m pytest -m "not ray"

clean-runs:
	rm -rf runs
