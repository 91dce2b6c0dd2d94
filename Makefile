# `make demo` and `make test` on a fresh machine create .venv at the repository root and install
# the locked versions (requirements/cpu.lock.txt, or gpu.lock.txt where nvidia-smi is found),
# then the project itself; `demo` runs the one-command demo (runs/demo), `test` the linters and
# the tests. `make lock` refreshes both locks from pyproject.toml and requirements/{cpu,gpu}.txt.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
LOCK := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo requirements/gpu.lock.txt || echo requirements/cpu.lock.txt)
# Where the CPU build of torch is found when locking: a local wheel folder, or elsewhere
# TORCH_CPU_WHEELS="--extra-index-url https://download.pytorch.org/whl/cpu --index-strategy unsafe-best-match".
TORCH_CPU_WHEELS ?= --find-links /opt/wheels
LOCK_DATE ?= $(shell date -u +%Y-%m-%dT00:00:00Z)
UV_COMPILE = $(VENV)/bin/uv pip compile pyproject.toml --extra dev --python-version 3.11 \
	--python-platform x86_64-manylinux_2_28 --exclude-newer $(LOCK_DATE) --quiet

.PHONY: setup demo test lint protos lock bench-teacher bench-student bench-data clean

$(VENV)/.installed: pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r $(LOCK)
	$(PY) -m pip install --quiet --no-deps -e .
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/kdserve-demo

test: lint
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -p no:cacheprovider --durations=15

lint: setup
	$(VENV)/bin/ruff check teacher_server student_worker tests bench
	$(VENV)/bin/mypy teacher_server student_worker

protos: setup
	$(PY) protos/generate.py

lock:  # needs uv in the venv (the dev extra has it): run after `make setup`
	$(UV_COMPILE) requirements/cpu.txt $(TORCH_CPU_WHEELS) -o requirements/cpu.lock.txt
	$(UV_COMPILE) requirements/gpu.txt -o requirements/gpu.lock.txt

bench-teacher: setup
	MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824 $(PY) bench/teacher_throughput.py

bench-student: setup
	MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824 $(PY) bench/student_throughput.py

bench-data: setup
	MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824 $(PY) bench/data_throughput.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
