# Two commands on a fresh clone: `make demo` runs the main job, `make test` runs the tests.
# Both create .venv and install the project (with its test extras) on first use.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast install clean-runs chromium

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -c constraints.txt -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) jobs/demo.py --config configs/demo.yaml

test: $(STAMP) chromium
	$(PY) -m pytest

# tests/test_review.py renders the HTML review pages in headless Chromium (Debian's package).
chromium:
	@if [ ! -x /usr/bin/chromium ]; then \
		echo "installing Chromium for the HTML rendering tests"; \
		(apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium) || \
		{ echo "Chromium is missing and could not be installed: run 'apt-get install chromium' as root"; exit 1; }; \
	fi

# Everything except the Ray tests: about a minute.
test-fast: $(STAMP)
	$(PY) -m pytest -m "not ray"

clean-runs:
	rm -rf runs
