"""Benchmark harness: `python -m bench.run` measures the trainer against plain Keras and the CPU."""
