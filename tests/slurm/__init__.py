"""The Slurm test cluster (harness.py)."""
