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

course: setup
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
	$(BIN)/python -m xcomp_lab.tools.site --out site --extra results/full-h100

# Run the course at tiny scale, record its timings and results in docs/ and regenerate docs/instructor-guide.md.
# NOTE="..." says what else ran on the machine (it is printed under the timings).
NOTE ?=
guide: setup
	OMP_NUM_THREADS=1 $(BIN)/python -m xcomp_lab.tools.course --output course-output/guide
	OMP_NUM_THREADS=1 $(BIN)/python -m xcomp_lab.tools.guide --timings course-output/guide/timings.json --note "$(NOTE)"
