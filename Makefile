# The two commands of the README: `make lab` and `make test`. Each sets itself up, and a failed
# first attempt (no python3-venv, a download cut off) is picked up where it stopped by running it again.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# Which torch to install first (CI pins the CPU wheel it has on disk; Colab already has torch).
TORCH  ?= torch>=2.11
STAMP  := $(VENV)/.memopt-installed
PORT   ?= 8888
# Jupyter refuses to run as root unless told (containers, Colab-like VMs)
ROOT_FLAG := $(if $(filter 0,$(shell id -u)),--allow-root,)

.PHONY: venv setup lab test labs clean help heldout

help:
	@echo "make lab    - set up .venv and open the labs in JupyterLab"
	@echo "make test   - set up .venv and run the whole test suite"
	@echo "make labs   - regenerate labs/ from solutions/ (course authors)"
	@echo "make heldout - grade the held-out wrong answers with memopt-grade (minutes; CI runs it after make test)"
	@echo "make clean  - remove .venv (and its Jupyter kernel), build files and caches"

# A usable venv is one whose python runs and imports pip. Anything else left by an earlier attempt
# (python but no pip after a failed ensurepip, a python whose base interpreter is gone) is rebuilt.
venv:
	@if [ -e "$(VENV)" ] && ! "$(PY)" -c "import pip" >/dev/null 2>&1; then \
	  echo "[memopt] $(VENV) is incomplete (an earlier setup stopped half-way): rebuilding it"; \
	  rm -rf "$(VENV)"; \
	fi
	@if [ ! -e "$(VENV)" ]; then \
	  echo "[memopt] creating $(VENV) with $(PYTHON)"; \
	  if ! $(PYTHON) -m venv "$(VENV)"; then \
	    rm -rf "$(VENV)"; \
	    echo ""; \
	    echo "[memopt] '$(PYTHON) -m venv' failed, so no $(VENV) was kept. On Debian/Ubuntu install the venv"; \
	    echo "         module:  sudo apt install python3-venv   (or python3.X-venv for your python3 -V),"; \
	    echo "         or pass another interpreter: make lab PYTHON=python3.11. Then run the same make command again."; \
	    exit 1; \
	  fi; \
	fi

$(STAMP): pyproject.toml
	$(PY) -m pip install --quiet --upgrade pip
	@echo "[memopt] installing $(TORCH), the largest download (pip shows its progress)"
	$(PY) -m pip install "$(TORCH)"
	$(PY) -m pip install -e ".[dev]"
# one kernel, inside the venv (a kernel named `memopt` in ~/.local from older versions is removed)
	-@$(PY) -m jupyter kernelspec remove -y memopt >/dev/null 2>&1
	$(PY) -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (memopt)"
	@touch $(STAMP)

# Two steps in two make runs, so that a venv rebuilt by the first is seen (with no stamp) by the second.
setup:
	@$(MAKE) --no-print-directory venv VENV="$(VENV)" PYTHON="$(PYTHON)"
	@$(MAKE) --no-print-directory $(STAMP) VENV="$(VENV)" PYTHON="$(PYTHON)" TORCH="$(TORCH)"

lab: setup
	$(VENV)/bin/jupyter lab --notebook-dir=labs --port=$(PORT) $(ROOT_FLAG) $(JUPYTER_ARGS)

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

labs: setup
	$(PY) -m memopt_lib.labgen solutions labs

# Every held-out wrong answer (tests/heldout/labNN.py) must score below the instructor's solution when graded by
# memopt-grade (one batch per lab, sandboxed, memory measured from outside). Run as root for the full sandbox.
heldout: setup
	$(PY) tests/heldout/run.py --record tests/heldout/RESULTS.md $(HELDOUT_ARGS)

clean:
	rm -rf "$(VENV)" build dist *.egg-info .pytest_cache
	find . -name __pycache__ -type d -prune -not -path "./.git/*" -exec rm -rf {} +
