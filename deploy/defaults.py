"""Defaults that every deploy tool (deploy/vertex.py, deploy/k8s/) gives the trainer."""

# The trainer's --max_job_restarts on a platform that restarts it: starts of the chief without a
# finished run, then exit 7 (a code no platform retries). The trainer's own default is 0 (no
# cap), for local runs.
DEFAULT_MAX_JOB_RESTARTS = 5
