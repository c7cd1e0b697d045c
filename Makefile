# The two commands of the README: `make lab` and `make test`. Each sets itself up.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# Which torch to install first (CI pins the CPU wheel it has on disk; Colab already has torch).
TORCH  ?= torch>=2.11
STAMP  := $(VENV)/.memopt-installed
PORT   ?= 8888
# Jupyter refuses to run as root unless told (containers, Colab-like VMs)
ROOT_FLAG := $(if $(filter 0,$(shell id -u)),--allow-root,)

.PHONY: setup lab test labs help

help:
	@echo "make lab   - set up .venv and open the labs in JupyterLab"
	@echo "make test  - set up .venv and run the whole test suite"
	@echo "make labs  - regenerate labs/ from solutions/ (course authors)"

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[dev]"
	$(PY) -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (memopt)"
	$(PY) -m ipykernel install --user --name memopt --display-name "Python (memopt)"
	@touch $(STAMP)

setup: $(STAMP)

lab: setup
	$(VENV)/bin/jupyter lab --notebook-dir=labs --port=$(PORT) $(ROOT_FLAG) $(JUPYTER_ARGS)

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

labs: setup
	$(PY) -m memopt_lib.labgen solutions labs
