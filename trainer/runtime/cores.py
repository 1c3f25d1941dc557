"""How many CPU cores this process may use, without TensorFlow (the launcher asks too)."""

import os


def available(environ=None, cgroup_root: str = "/sys/fs/cgroup") -> int:
  """Affinity, the container's CPU quota and the launcher's per-worker share
  (TF_NUM_INTRAOP_THREADS), whichever is smallest; at least 1."""
  environ = os.environ if environ is None else environ
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  cores = min(cores or 1, cgroup_quota(cgroup_root) or cores or 1)
  share = environ.get("TF_NUM_INTRAOP_THREADS", "")
  if share.isdigit() and int(share) > 0:
    cores = min(cores, int(share))
  return max(1, cores)


def cgroup_quota(root: str = "/sys/fs/cgroup"):
  """ceil(quota / period) from cgroup v2 cpu.max or v1 cfs files; None when unlimited."""
  try:
    with open(os.path.join(root, "cpu.max")) as f:
      quota, period = f.read().split()[:2]
  except (OSError, ValueError):
    try:
      with open(os.path.join(root, "cpu", "cpu.cfs_quota_us")) as f:
        quota = f.read().strip()
      with open(os.path.join(root, "cpu", "cpu.cfs_period_us")) as f:
        period = f.read().strip()
    except OSError:
      return None
  if quota in ("max", "-1") or not period.isdigit() or int(period) <= 0:
    return None
  return max(1, -(-int(quota) // int(period)))
