# Two entry points: `make demo` (offline training demo) and `make test`.
# Both create and use the virtual environment at .venv.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
WORKDIR ?= runs/digits_demo

.PHONY: venv demo test clean
venv: $(VENV)/.installed

# constraints.txt pins every package to the version the README's numbers were
# measured with, so a fresh machine reproduces them.
$(VENV)/.installed: setup.cfg pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[test,plot]'
	touch $@

demo: venv
	$(PY) -m cmim_jax.main --config configs/digits.py --workdir $(WORKDIR)

test: venv
	XLA_FLAGS=--xla_force_host_platform_device_count=8 $(PY) -m pytest -n 2 --durations=15 tests

clean:
	rm -rf $(VENV) runs
