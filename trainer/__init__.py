"""Distributed TensorFlow training job package: MNIST CNN on one device, many devices or many workers."""

import os

# TensorFlow turns its oneDNN CPU kernels on by default only on CPUs with AVX-512 VNNI/BF16 or
# AMX; on other x86 CPUs (AVX2 Zen 3, for one) they still run this CNN about 2x faster. The
# variable is read when TensorFlow loads, which is why it is set here, before any trainer
# module imports it; an explicit TF_ENABLE_ONEDNN_OPTS=0 from the user still wins.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
