# The two commands of the README:  make demo   and   make test
# Both set everything up on a fresh machine first (a virtualenv in .venv, torch 2.13.0 before
# anything else so pip never pulls a CUDA build, then the project and its pinned dependencies).

VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q --disable-pip-version-check

.PHONY: setup demo test bench

setup: $(VENV)/.installed

$(VENV)/.installed: setup.py scripts/install.sh scripts/packaged-data.txt
	bash scripts/install.sh $(VENV)
	touch $@

demo: setup
	bash scripts/system-deps.sh demo
	$(VENV)/bin/homodistil demo configs/demo.yaml

test: setup
	bash scripts/system-deps.sh test
	$(PY) -m pytest -q --durations=20 tests

bench: setup
	$(PY) benchmarks/recipe.py
