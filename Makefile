# Two commands for a fresh machine with python3 (>= 3.11) and pip:
#   make demo   -> virtualenv + install + tiny end-to-end run on the embedded data
#   make test   -> virtualenv + install + test suite
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
WORKDIR ?= /tmp/genvis_demo

.PHONY: install demo test clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) -m genvis_jax.main --config=configs/demo.py --workdir=$(WORKDIR)

test: install
	$(PY) -m pytest tests -n 2 --dist=loadfile --no-loadscope-reorder

clean:
	rm -rf $(VENV)
