"""Distributed TensorFlow training job package: MNIST CNN on one device, many devices or many workers.

Importing the package changes nothing in the process; the entry points set TensorFlow's
environment themselves (trainer/startup.py).
"""
