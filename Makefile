# Two entry points, each creating (once) and reusing the virtual environment in $(VENV):
#   make course   runs every notebook in order and renders the summary (SCALE=full DEVICE=cuda for a GPU)
#   make test     runs the package tests, nbval and the papermill runs
# and two for instructors: make site (the static HTML edition), make guide (re-measure the instructor guide)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.xcomp-lab-$(shell cat requirements.txt pyproject.toml | sha1sum | cut -c1-12)
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup course test lab browser-test site guide

$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

setup: $(STAMP)

# MODEL=/path/to/checkpoint runs the course on it; a checkpoint of the original model's own code (transformers
# 4.33.2) runs its notebooks in a kernel of $(ORIGINAL_VENV), created here first (xcomp_lab.original.kernel).
course: setup
	@if [ -n "$(MODEL)" ] && $(BIN)/python -c "import sys; from xcomp_lab.original.detect import uses_original_code; \
		sys.exit(0 if uses_original_code(sys.argv[1]) else 1)" "$(MODEL)"; then $(MAKE) venv-original; fi
	$(BIN)/python -m xcomp_lab.tools.course

# Two workers, one thread each: notebooks and the two course runs are spread over the cores.
test: setup
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n 2 --dist loadfile

# JupyterLab on the notebooks with this environment's kernel (the notebooks' "python3" is the venv's Python) and
# the widgets extension; LAB_ARGS adds options (e.g. --no-browser --port=8890); as root it needs --allow-root.
LAB_DIR ?= notebooks
LAB_ARGS ?=
lab: setup
	$(BIN)/python -m jupyter lab $(LAB_DIR) $(if $(filter 0,$(shell id -u)),--allow-root) $(LAB_ARGS)

# The planner in a real browser (Debian's chromium, driven by Playwright): notebook 08 in JupyterLab, a widget
# changed, its text and chart checked; rewrites images/planner-browser.png. `make test` runs a shorter form.
browser-test: setup
	BROWSER_TEST=full BROWSER_SCREENSHOT=images/planner-browser.png $(BIN)/python -m pytest -o addopts="" -v tests/test_browser.py

# The static HTML edition: tiny-scale notebooks, the full-scale GPU ones and the instructor guide -> site/index.html
site: setup
	$(BIN)/python -m xcomp_lab.tools.site --out site --extra results/full-h200

# Run the course at tiny scale, record its timings and results in docs/ and regenerate docs/instructor-guide.md.
# NOTE="..." says what else ran on the machine (it is printed under the timings).
NOTE ?=
guide: setup
	OMP_NUM_THREADS=1 $(BIN)/python -m xcomp_lab.tools.course --output course-output/guide
	OMP_NUM_THREADS=1 $(BIN)/python -m xcomp_lab.tools.guide --timings course-output/guide/timings.json --note "$(NOTE)"

# The original model's own remote code pins transformers 4.33.2: a second environment for it, created once from
# requirements-original.txt (whose header says why torch comes from ORIGINAL_TORCH), with this checkout installed
# editable and a Jupyter kernel's packages (`make course MODEL=...` runs the notebooks there). tests/test_original_code.py
# runs the remote code in it; `make test` creates it where the reference copy of that code lies beside the checkout.
ORIGINAL_VENV ?= .venv-original
ORIGINAL_TORCH ?= torch==2.14.1 torchvision==0.29.1
ORIGINAL_KEY := $(shell (cat requirements-original.txt; echo '$(ORIGINAL_TORCH)') | sha1sum | cut -c1-12)
ORIGINAL_STAMP := $(ORIGINAL_VENV)/.xcomp-lab-$(ORIGINAL_KEY)
ORIGINAL_CODE := $(wildcard ../shared/reference/internlm-xcomposer2-vl-7b/modeling_internlm_xcomposer2.py)

.PHONY: venv-original

$(ORIGINAL_STAMP): requirements-original.txt
	test -x $(ORIGINAL_VENV)/bin/python || $(PYTHON) -m venv $(ORIGINAL_VENV)
	$(ORIGINAL_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(ORIGINAL_VENV)/bin/python -m pip install --quiet $(ORIGINAL_TORCH)
	$(ORIGINAL_VENV)/bin/python -m pip install --quiet -r requirements-original.txt
	$(ORIGINAL_VENV)/bin/python -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

venv-original: $(ORIGINAL_STAMP)

ifneq ($(ORIGINAL_CODE),)
test: venv-original
endif
