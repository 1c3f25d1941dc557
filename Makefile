# One virtual environment per clone; every target installs what it needs first.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
# Two stamps: `make train` installs the runtime only; `make test` adds the test extras.
RUNTIME := $(VENV)/.installed-runtime
STAMP := $(VENV)/.installed-test
ARGS ?=
WORKERS ?= 2
MODEL_DIR ?= runs/mnist
# A cluster run gets its own directory: resuming the single-process run's checkpoint with
# another cluster shape would train nothing, or something else than asked.
CLUSTER_MODEL_DIR ?= runs/mnist-cluster
PYTEST_ARGS ?=
# e.g. LAUNCHER_ARGS="--evaluator --max_restarts=2" for make cluster
LAUNCHER_ARGS ?=

.PHONY: venv train test test-fast cluster predict bench gpu-check package image submit-vertex clean

venv: $(STAMP)

# The installer: uv (one wheel from PyPI, put into the venv by pip in ~2 s) installs the same
# versions as pip, from PyPI, in about a quarter of pip's time (bench/README.md, "First
# contact"). INSTALLER=pip uses pip alone, e.g. behind a private index in pip.conf, which uv
# does not read (uv reads UV_INDEX_URL instead); pip also takes over where uv cannot be had
# or fails. --compile-bytecode, as pip does: without it the first run compiles TensorFlow's
# modules itself (6-7 s more start-up).
INSTALLER ?= uv
install = if [ "$(INSTALLER)" = uv ] && $(PY) -m pip install --quiet --disable-pip-version-check uv \
	  && $(VENV)/bin/uv pip install --quiet --compile-bytecode --python $(PY) $(1); then :; \
	else $(PY) -m pip install --quiet --disable-pip-version-check $(1); fi

$(RUNTIME): setup.py
	$(PYTHON) -m venv $(VENV)
	@if command -v nvidia-smi >/dev/null 2>&1; then \
	  echo "nvidia-smi found: installing TensorFlow's CUDA extra"; \
	  $(call install,-e '.[gpu]'); \
	else \
	  $(call install,-e .); \
	fi
	touch $(RUNTIME)

$(STAMP): $(RUNTIME)
	@$(call install,-e '.[test]')
	touch $(STAMP)

train: $(RUNTIME)
	$(PY) -m trainer.task --model_dir=$(MODEL_DIR) $(ARGS)

# The fast tier side by side (test-fast), then the slow tier two tests at a time: most of a
# multi-process test is start-up and waiting, not both cores, and its bounded waits (collective
# timeouts of 5 s and more, subprocess bounds of minutes) hold with a neighbour on the cores.
# pytest's exit 5 (no test selected, e.g. PYTEST_ARGS picks only slow ones) is fine.
test: test-fast
	$(PY) -m pytest tests -m slow -n 2 $(PYTEST_ARGS) || [ $$? -eq 5 ]

# The fast tier: nothing trains or starts TensorFlow in a subprocess; its bounded waits (timeouts,
# retries, a stalled server) overlap in 4 processes.
test-fast: $(STAMP)
	$(PY) -m pytest tests -m "not slow" -n 4 $(PYTEST_ARGS) || [ $$? -eq 5 ]

cluster: $(RUNTIME)
	$(PY) -m trainer.launcher --workers=$(WORKERS) $(LAUNCHER_ARGS) -- --model_dir=$(CLUSTER_MODEL_DIR) $(ARGS)

predict: $(RUNTIME)
	$(PY) -m trainer.predict --model_dir=$(MODEL_DIR) --samples=5

bench: $(STAMP)
	$(PY) -m bench.run $(ARGS)

# Every GPU path (MirroredStrategy with NCCL, float16, XLA, 2 workers) trained and measured in
# under 8 minutes on a machine with NVIDIA GPUs (bench/gpu_check.py); exits 2 at once, with one
# line, where there is none. Offline: MNIST is vendored, and the venv has '.[gpu]' when `make`
# built it where nvidia-smi exists.
gpu-check: $(RUNTIME)
	@$(PY) -m bench.gpu_check $(ARGS)

package: $(STAMP)
	rm -rf dist
	$(PY) -m pip install --quiet build
	$(PY) -m build --sdist --wheel --outdir dist .

image:
	@command -v docker >/dev/null 2>&1 || { echo "make image needs Docker"; exit 2; }
	deploy/build_image.sh $${IMAGE:-mnist-trainer:latest}

submit-vertex: $(STAMP)
	$(PY) -m deploy.vertex submit $(ARGS)

clean:
	rm -rf build dist *.egg-info
