# Two commands do everything: `make reproduce` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export MPLBACKEND ?= Agg
# Parallel workers for the test run (pytest-xdist, one notebook file per worker).
JOBS ?= 2

.PHONY: venv reproduce test test-portable execute clean

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

# The checked notebook cells under each PyTorch CPU kernel family and with 1 and 2 threads:
# their claims must hold on any CPU (DESIGN.md section 6). About 6 x the notebook part of `make test`.
CAPABILITIES ?= default avx2 avx512
test-portable: venv
	@for cap in $(CAPABILITIES); do for th in 1 2; do \
	  echo "== ATEN_CPU_CAPABILITY=$$cap, $$th thread(s)"; \
	  ATEN_CPU_CAPABILITY=$$cap ADJOINTDPM_THREADS=$$th OMP_NUM_THREADS=$$th \
	    $(PY) -m pytest -q -n $(JOBS) --dist loadfile -p no:cacheprovider --nbval-lax notebooks/ || exit 1; \
	done; done

# Re-execute notebooks in place, as they are committed (inline figures, no progress bars):
# `make execute NB=notebooks/03_toy_2d.ipynb`.
NB ?= notebooks/[0-9]*.ipynb
execute: venv
	@for nb in $(NB); do echo "executing $$nb"; \
	  env -u MPLBACKEND $(PY) -m jupyter nbconvert --to notebook --execute --inplace \
	    --ExecutePreprocessor.timeout=1800 $$nb || exit 1; \
	  $(PY) scripts/clean_notebooks.py $$nb; \
	done

clean:
	rm -rf outputs .pytest_cache
