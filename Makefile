# `make demo` and `make test` on a fresh machine create .venv at the repository root and install
# the project with pinned torch (the CPU build when no GPU is present); then `demo` runs the
# one-command demo (runs/demo) and `test` the linters and the tests.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
TORCH_REQUIREMENTS := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo requirements/gpu.txt || echo requirements/cpu.txt)

.PHONY: setup demo test lint protos bench-teacher bench-student clean

$(VENV)/.installed: pyproject.toml requirements/cpu.txt requirements/gpu.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r $(TORCH_REQUIREMENTS)
	$(PY) -m pip install --quiet -c $(TORCH_REQUIREMENTS) -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/kdserve-demo

test: lint
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -p no:cacheprovider

lint: setup
	$(VENV)/bin/ruff check teacher_server student_worker tests bench
	$(VENV)/bin/mypy teacher_server student_worker

protos: setup
	$(PY) -m grpc_tools.protoc -Iteacher_server/_proto=protos --python_out=. --pyi_out=. \
		--grpc_python_out=. protos/teacher.proto

bench-teacher: setup
	MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824 $(PY) bench/teacher_throughput.py

bench-student: setup
	MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824 $(PY) bench/student_throughput.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
