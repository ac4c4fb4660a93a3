# The two commands: `make demo` and `make test`. Both create .venv and install on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# CPU machines get the CPU build of torch (served from a local wheel where one exists);
# a machine with an NVIDIA driver keeps whatever torch>=2.11 pip resolves.
TORCH_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo "torch>=2.11" || echo "torch==2.13.0")
# CUDA builds of torch bring their own Triton; on CPU machines Triton is installed for its interpreter,
# which runs the Triton decode kernels' tests (skipped where it cannot be installed).
TRITON_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo "" || echo "triton==3.6.0")

.PHONY: install demo test test-all clean-demo

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev,serve]"
	$(if $(TRITON_SPEC),$(PY) -m pip install -q "$(TRITON_SPEC)" || echo "triton not installed: its interpreter tests will be skipped")
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/picochat demo

# pytest-xdist: one worker per core (at most 4), a test file's tests on one worker (its session
# fixtures are built once); each worker gives torch one thread (tests/conftest.py)
test: $(STAMP)
	$(PY) -m pytest -q -n auto --maxprocesses 4 --dist loadfile

test-all: $(STAMP)
	$(PY) -m pytest -q -m "not gpu"

clean-demo:
	rm -rf $${PICOCHAT_HOME:-$$HOME/.cache/picochat}/runs/demo
