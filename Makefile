# The two commands a user needs: `make demo` (set up, run the main job) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
FASHION_MNIST := /usr/share/datasets/fashion-mnist

.PHONY: setup data postgres compiler demo test test-all bench

setup: $(VENV)/.installed data postgres compiler

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[test]"
	touch $@

# Real image data without network: Debian's dataset-fashion-mnist. Where apt is not ours to use,
# the tests that need it skip and say why.
data:
	@if [ -d $(FASHION_MNIST) ]; then :; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		(apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null) \
		|| echo "note: could not install dataset-fashion-mnist; Fashion-MNIST tests will skip"; \
	elif command -v apt-get >/dev/null && sudo -n true 2>/dev/null; then \
		(sudo apt-get update -qq && sudo apt-get install -y -qq dataset-fashion-mnist >/dev/null) \
		|| echo "note: could not install dataset-fashion-mnist; Fashion-MNIST tests will skip"; \
	else echo "note: dataset-fashion-mnist not installed (needs apt as root); Fashion-MNIST tests will skip"; fi

# A C compiler: shape-wise layers compile their kernel on first use (sparsesearch/native.py); without
# one they run their eager forms, 1.2-2x slower, and say so.
compiler:
	@if command -v $${CC:-cc} >/dev/null; then :; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gcc >/dev/null) \
		|| echo "note: could not install gcc; shape-wise layers will run without their compiled kernel"; \
	else echo "note: no C compiler (apt-get install gcc); shape-wise layers will run without their compiled kernel"; fi

# A real PostgreSQL server for the shared-storage tests: Debian's postgresql (initdb and pg_ctl
# under /usr/lib/postgresql/VER/bin). The tests start a throwaway cluster of their own; where apt
# is not ours to use, they skip and say why.
postgres:
	@if (command -v initdb && command -v pg_ctl) >/dev/null \
		|| ls /usr/lib/postgresql/*/bin/initdb /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1; then :; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null) \
		|| echo "note: could not install postgresql; PostgreSQL tests will skip"; \
	elif command -v apt-get >/dev/null && sudo -n true 2>/dev/null; then \
		(sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null) \
		|| echo "note: could not install postgresql; PostgreSQL tests will skip"; \
	else echo "note: postgresql not installed (needs apt as root); PostgreSQL tests will skip"; fi

demo: setup
	$(VENV)/bin/sparsesearch optimize --budget 20 --threads 1
	$(VENV)/bin/sparsesearch finalize digits-cnn-digits --threads 1

test: setup
	$(PY) -m pytest -m "not slow" -q

test-all: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) bench/baselines.py
	$(PY) bench/admm_vs_oneshot.py
	$(PY) bench/compaction.py
	$(PY) bench/channel_blocks.py
	$(PY) bench/latency_model.py
	$(PY) bench/search.py
	$(PY) bench/faithfulness.py
	$(PY) bench/generated.py
	$(PY) bench/scale.py
