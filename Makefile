# Two commands do all set-up: `make demo` and `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# torch is installed first and pinned so that no later requirement can pull a CUDA build.
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: install demo test lint format data bench clean

$(PY):
	python3 -m venv $(VENV)

$(STAMP): $(PY) pyproject.toml
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e ".[lab,dev,tabular]" "$(TORCH)"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/gramnewton demo

test: $(STAMP)
	$(PY) -m pytest -q

# ruff: lint rules and the format check (rules in pyproject.toml); `make format` rewrites.
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# Fashion-MNIST IDX files for the AFAD-scale stand-in (Debian package dataset-fashion-mnist).
data:
	@test -d /usr/share/datasets/fashion-mnist || (apt-get update -q && apt-get install -y -q dataset-fashion-mnist)

bench: $(STAMP)
	$(PY) benchmarks/step_cost.py

clean:
	rm -rf $(VENV) runs build *.egg-info src/*.egg-info
