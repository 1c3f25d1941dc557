# One virtual environment per clone; every target installs what it needs first.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
ARGS ?=
WORKERS ?= 2
MODEL_DIR ?= runs/mnist
PYTEST_ARGS ?=

.PHONY: venv train test test-fast cluster predict bench package image submit-vertex clean

venv: $(STAMP)

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1; then \
	  echo "nvidia-smi found: installing TensorFlow's CUDA extra"; \
	  $(PY) -m pip install --quiet -e '.[test,gpu]'; \
	else \
	  $(PY) -m pip install --quiet -e '.[test]'; \
	fi
	touch $(STAMP)

train: $(STAMP)
	$(PY) -m trainer.task --model_dir=$(MODEL_DIR) $(ARGS)

test: $(STAMP)
	$(PY) -m pytest tests $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest tests -m "not slow" $(PYTEST_ARGS)

cluster: $(STAMP)
	$(PY) -m trainer.launcher --workers=$(WORKERS) -- $(ARGS)

predict: $(STAMP)
	$(PY) -m trainer.predict --model_dir=$(MODEL_DIR) --samples=5

bench: $(STAMP)
	$(PY) -m bench.run $(ARGS)

package: $(STAMP)
	rm -rf dist
	$(PY) -m pip install --quiet build
	$(PY) -m build --sdist --wheel --outdir dist .

image:
	@command -v docker >/dev/null 2>&1 || { echo "make image needs Docker"; exit 2; }
	docker build -f deploy/Dockerfile -t $${IMAGE:-mnist-trainer:latest} .

submit-vertex: $(STAMP)
	$(PY) -m deploy.vertex submit $(ARGS)

clean:
	rm -rf build dist *.egg-info
