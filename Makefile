# Quick start on a fresh machine: `make demo` runs the main job, `make test` the whole suite (`make test-unit`
# the tests that start no Ray and are not slow).
# Both create .venv and install on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The CPU wheel of torch lies on disk on our CPU machines; pinning it first keeps pip from pulling
# a multi-GB CUDA build. Override on GPU machines: make TORCH_SPEC="torch" ...
TORCH_SPEC ?= torch==2.13.0
# Triton for the tests that run the GPU kernels under its interpreter on CPU: the version known to interpret
# them (3.9.0's interpreter rejects one of the resize kernel's masks). A CUDA torch pins its own Triton: on GPU
# machines pass TEST_TRITON= with TORCH_SPEC.
TEST_TRITON ?= triton==3.5.1

.PHONY: demo test test-unit install clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	# s3fs and moto in one resolve: installed apart, moto upgrades botocore past what aiobotocore accepts.
	$(PY) -m pip install -q -e ".[test]" "$(TORCH_SPEC)" $(TEST_TRITON)
	touch $@

install: $(VENV)/.installed

demo: $(VENV)/.installed
	$(PY) run_pipeline.py --config configs/demo.yaml

test: $(VENV)/.installed
	$(PY) -m pytest -q

# The quick local loop: no Ray, no `ray start` cluster, nothing marked slow (CI runs `make test`: all of it).
test-unit: $(VENV)/.installed
	$(PY) -m pytest -q -m "not cluster and not ray and not slow"

clean:
	rm -rf $(VENV) out
