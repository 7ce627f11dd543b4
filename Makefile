# Two commands do everything: `make reproduce` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export MPLBACKEND ?= Agg
# Parallel workers for the test run (pytest-xdist, one notebook file per worker).
JOBS ?= 2

.PHONY: venv reproduce test clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned (CPU wheel here; install a CUDA build yourself for a GPU)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m ipykernel install --user --name python3 >/dev/null
	touch $@

venv: $(VENV)/.installed

reproduce: venv
	$(PY) scripts/reproduce.py

test: venv
	$(PY) -m pytest -q -n $(JOBS) --dist loadfile tests/ \
	    $$(ls notebooks/*.ipynb >/dev/null 2>&1 && echo --nbval-lax notebooks/) ; \
	  rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc

clean:
	rm -rf outputs .pytest_cache
