# slicjax: `make test` and `make demo` each set up .venv on a fresh machine first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
EXTRAS ?= dev,hf,pretrained
STAMP := $(VENV)/.installed-$(EXTRAS)
PYTEST_ARGS ?=

.PHONY: venv test demo lint format bench clean

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	XLA_FLAGS=--xla_force_host_platform_device_count=8 $(PY) -m pytest -q -n 2 --durations=15 $(PYTEST_ARGS)

demo: $(STAMP)
	$(PY) experiments/demo.py --workdir=runs/demo $(DEMO_ARGS)

# Lint only: the code is wrapped by hand (2-space indent, 100 columns), which `ruff format`
# would rewrite; `make format` is there for new files.
lint: $(STAMP)
	$(VENV)/bin/ruff check slicjax experiments tests benchmarks

format: $(STAMP)
	$(VENV)/bin/ruff format slicjax experiments tests benchmarks

bench: $(STAMP)
	$(PY) benchmarks/train_throughput.py
	$(PY) benchmarks/decode_throughput.py

clean:
	rm -rf $(VENV) runs .pytest_cache
