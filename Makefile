# The two commands a newcomer needs: `make demo` and `make test`. Each installs what is missing.
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test lint bench bench-quick clean

setup:
	@tools/bootstrap

demo: setup
	$(VENV)/bin/ninefs demo $(ARGS)

test: setup
	$(PY) -m pytest -q $(ARGS)

lint: setup
	$(VENV)/bin/ruff check protocol servers ninefs tests bench
	$(VENV)/bin/ruff format --check protocol servers ninefs tests bench

bench: setup
	$(PY) -m bench $(ARGS)

bench-quick: setup
	$(PY) -m bench --quick $(ARGS)

clean:
	rm -rf $(VENV) build dist *.egg-info
