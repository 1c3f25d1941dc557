"""Distributed TensorFlow training job package: MNIST CNN on one device, many devices or many workers."""
