"""Builds TF_CONFIG from the Slurm step environment, then execs the trainer command in its place.

Usage (see deploy/slurm/train.sbatch):
  srun python -m deploy.slurm_env [--port_base=P] -- python -m trainer.task --flags...

The worker list follows Slurm's own node order, not TensorFlow's SlurmClusterResolver: that
resolver sorts host names as strings (`sorted(self._task_configuration.items())` in
tensorflow/python/distribute/cluster_resolver/slurm_cluster_resolver.py), so on node[9-10] it
lists node10 first while SLURM_PROCID 0 runs on node9, and two workers swap addresses.
"""

import json
import os
import re
import sys
from typing import Mapping, Optional, Sequence

from absl import app
from absl import flags

# Slurm hostlists: one bracket holds comma-separated numbers or lo-hi ranges, zero-padded to
# the width of lo (src/common/hostlist.c, _parse_single_range / _push_range_list).
_RANGE_RE = re.compile(r"^(\d+)(?:-(\d+))?$")
# "2(x3)" = 2 tasks on each of 3 consecutive nodes (sbatch(1), SLURM_TASKS_PER_NODE).
_TASKS_RE = re.compile(r"^(\d+)(?:\(x(\d+)\))?$")
# Inside a step srun sets the STEP_ variables; the job's own describe the whole allocation.
_STEP_VARS = ("SLURM_STEP_NODELIST", "SLURM_STEP_TASKS_PER_NODE", "SLURM_STEP_NUM_TASKS")
_JOB_VARS = ("SLURM_JOB_NODELIST", "SLURM_TASKS_PER_NODE", "SLURM_NTASKS")
# A heterogeneous job (components separated by ':' on the sbatch, salloc or srun line) has
# SLURM_HET_SIZE, the number of components, and its pre-20.02 name SLURM_PACK_SIZE in the batch
# script's and every task's environment; a normal allocation has neither. Slurm 22.05: srun(1)
# and sbatch(1) "OUTPUT ENVIRONMENT VARIABLES", doc/html/heterogeneous_jobs.shtml "Environment
# Variables", src/slurmctld/job_scheduler.c (the batch step's), src/srun/libsrun/srun_job.c and
# src/salloc/salloc.c (their own allocations), src/srun/libsrun/opt.c ("SLURM_HET_SIZE not
# defined for a normal allocation"). The per-component copies (SLURM_*_HET_GROUP_<n>) are no
# sign: srun in a normal job sets SLURM_JOB_CPUS_PER_NODE_PACK_GROUP_0 (srun_job.c, _build_key
# and _set_env_vars), as a real 22.05 cluster shows (tests/slurm_cluster_test.py).
_HET_SIZE_VARS = ("SLURM_HET_SIZE", "SLURM_PACK_SIZE")


class SlurmEnvError(RuntimeError):
  """Not inside a Slurm step, or a step environment that cannot be turned into a cluster."""


def _split_top_level(expr: str) -> list:
  """Splits a hostlist at the commas that are outside brackets."""
  items, depth, current = [], 0, ""
  for char in expr:
    if char == "[":
      depth += 1
      if depth > 1:
        raise SlurmEnvError(f"Hostlist {expr!r} has nested brackets.")
    elif char == "]":
      depth -= 1
      if depth < 0:
        raise SlurmEnvError(f"Hostlist {expr!r} has a ']' without '['.")
    if char == "," and depth == 0:
      items.append(current)
      current = ""
    else:
      current += char
  if depth:
    raise SlurmEnvError(f"Hostlist {expr!r} has an unclosed '['.")
  items.append(current)
  return [item.strip() for item in items if item.strip()]


def _expand_bracket(body: str, expr: str) -> list:
  """'01-03,7' -> ['01', '02', '03', '7']: each range keeps the width of its lower bound."""
  numbers = []
  for part in body.split(","):
    match = _RANGE_RE.match(part.strip())
    if not match:
      raise SlurmEnvError(f"Hostlist {expr!r}: bad range {part!r} in [{body}].")
    lo_text, hi_text = match.group(1), match.group(2)
    lo, hi = int(lo_text), int(hi_text if hi_text is not None else lo_text)
    if hi < lo:
      raise SlurmEnvError(f"Hostlist {expr!r}: range {part!r} runs backwards.")
    numbers.extend(str(n).zfill(len(lo_text)) for n in range(lo, hi + 1))
  return numbers


def _expand_item(item: str, expr: str) -> list:
  """One hostlist item; with several brackets the first varies slowest, as in Slurm."""
  match = re.match(r"^([^\[]*)\[([^\]]*)\](.*)$", item)
  if not match:
    return [item]
  prefix, body, rest = match.groups()
  tails = _expand_item(rest, expr) if rest else [""]
  return [f"{prefix}{number}{tail}" for number in _expand_bracket(body, expr) for tail in tails]


def expand_hostlist(expr: str) -> list:
  """'node[9-10]' -> ['node9', 'node10']; 'a[1-2],b3' -> ['a1', 'a2', 'b3']; order kept."""
  hosts = [host for item in _split_top_level(expr) for host in _expand_item(item, expr)]
  if not hosts:
    raise SlurmEnvError(f"Hostlist {expr!r} names no host.")
  if len(set(hosts)) != len(hosts):
    raise SlurmEnvError(f"Hostlist {expr!r} names a host twice.")
  return hosts


def expand_tasks_per_node(expr: str) -> list:
  """'2(x3),1' -> [2, 2, 2, 1], in node-list order."""
  counts = []
  for part in expr.split(","):
    match = _TASKS_RE.match(part.strip())
    if not match:
      raise SlurmEnvError(f"Tasks per node {expr!r}: cannot read {part!r}.")
    counts.extend([int(match.group(1))] * int(match.group(2) or 1))
  return counts


def _check_homogeneous(environ: Mapping[str, str]) -> None:
  """Heterogeneous jobs are refused: one step over several components gets per-component node
  lists and ranks this module does not model, and a plain srun in such a job runs on component
  0 alone, which would silently train on fewer workers than were allocated."""
  found = [name for name in _HET_SIZE_VARS if environ.get(name)]
  if found:
    raise SlurmEnvError(
        f"This is a heterogeneous Slurm job ({found[0]}={environ[found[0]]}), and heterogeneous "
        "jobs are not supported. Submit one homogeneous allocation with one task per node "
        "instead, without ':' components or --het-group: `NODES=N "
        "deploy/slurm/train.sbatch ...`, or `sbatch --nodes=N --ntasks-per-node=1 "
        "deploy/slurm/train.sbatch ...`.")


def _step_layout(environ: Mapping[str, str]) -> tuple:
  """(hosts, tasks per node, number of tasks): the step's, or the job's outside a step."""
  names = _STEP_VARS if environ.get(_STEP_VARS[0]) else _JOB_VARS
  missing = [name for name in names if not environ.get(name)]
  if missing:
    raise SlurmEnvError(f"{', '.join(missing)} not set: run this under srun inside an "
                        "allocation (deploy/slurm/train.sbatch does).")
  hosts = expand_hostlist(environ[names[0]])
  counts = expand_tasks_per_node(environ[names[1]])
  try:
    num_tasks = int(environ[names[2]])
  except ValueError:
    raise SlurmEnvError(f"{names[2]}={environ[names[2]]!r} is not a number.") from None
  if len(counts) != len(hosts):
    raise SlurmEnvError(f"{names[1]}={environ[names[1]]!r} gives {len(counts)} nodes but "
                        f"{names[0]}={environ[names[0]]!r} has {len(hosts)}.")
  if sum(counts) != num_tasks:
    raise SlurmEnvError(f"{names[1]}={environ[names[1]]!r} adds up to {sum(counts)} tasks, "
                        f"not {names[2]}={num_tasks}.")
  return hosts, counts, num_tasks


def worker_addresses(hosts: Sequence[str], counts: Sequence[int], port_base: int) -> list:
  """Task addresses in rank order under block distribution: a node's tasks take consecutive
  ranks and ports port_base, port_base + 1, ... so tasks sharing a node never share a port."""
  return [f"{host}:{port_base + local}" for host, count in zip(hosts, counts)
          for local in range(count)]


def _node_of_rank(counts: Sequence[int], rank: int) -> tuple:
  """(node index, local index) of a rank under block distribution."""
  first = 0
  for node, count in enumerate(counts):
    if rank < first + count:
      return node, rank - first
    first += count
  raise AssertionError("rank checked against the task count before")


def _check_own_node(environ: Mapping[str, str], hosts, counts, rank: int) -> None:
  """This task must run where the block layout puts it, or the workers would dial the wrong
  peers. srun(1) --distribution: block, the default, "will distribute tasks to a node such
  that consecutive tasks share a node"; a cyclic or plane layout, or a node list whose order
  is not the task order, fails here. SLURMD_NODENAME is the node running this task."""
  node, local = _node_of_rank(counts, rank)
  actual = environ.get("SLURMD_NODENAME")
  if not actual:
    raise SlurmEnvError("SLURMD_NODENAME is not set: run this under srun, which sets it.")
  if actual != hosts[node]:
    raise SlurmEnvError(f"Task SLURM_PROCID={rank} runs on {actual}, but the node list puts it "
                        f"on {hosts[node]}: task ranks must follow the node list in blocks; drop "
                        "srun's --distribution (block is Slurm's default) or pass "
                        "--distribution=block.")
  local_id = environ.get("SLURM_LOCALID")
  if local_id is not None and local_id.isdigit() and int(local_id) != local:
    raise SlurmEnvError(f"Task SLURM_PROCID={rank} has SLURM_LOCALID={local_id}, but the node "
                        f"list makes it local task {local} of {hosts[node]}.")


def tf_config(port_base: int = 8888, environ: Optional[Mapping[str, str]] = None) -> dict:
  """TF_CONFIG for this task: every task of the step is a 'worker', index = SLURM_PROCID."""
  environ = os.environ if environ is None else environ
  _check_homogeneous(environ)
  hosts, counts, num_tasks = _step_layout(environ)
  try:
    rank = int(environ["SLURM_PROCID"])
  except (KeyError, ValueError):
    raise SlurmEnvError("SLURM_PROCID is missing or not a number: run this under srun.") from None
  if not 0 <= rank < num_tasks:
    raise SlurmEnvError(f"SLURM_PROCID={rank} is outside the step's {num_tasks} tasks.")
  if not 1 <= port_base <= 65535 - max(counts) + 1:
    raise SlurmEnvError(f"--port_base={port_base}: ports up to port_base + {max(counts) - 1} "
                        "must fit in 1-65535.")
  _check_own_node(environ, hosts, counts, rank)
  return {"cluster": {"worker": worker_addresses(hosts, counts, port_base)},
          "task": {"type": "worker", "index": rank}}


FLAGS = flags.FLAGS


def _define_flags() -> None:
  """Defined only when run as a program, so tests can import this module next to others."""
  flags.DEFINE_integer("port_base", 8888,
                       "gRPC port of the first task on each node (the next task gets +1).")


def main(argv: Sequence[str]) -> Optional[int]:
  command = list(argv[1:])
  if not command:
    sys.stderr.write("deploy.slurm_env: error: give the trainer command after `--`.\n")
    return 2
  try:
    config = tf_config(FLAGS.port_base)
  except SlurmEnvError as e:
    sys.stderr.write(f"deploy.slurm_env: error: {e}\n")
    return 2
  os.environ["TF_CONFIG"] = json.dumps(config)
  sys.stderr.write(f"deploy.slurm_env: TF_CONFIG={os.environ['TF_CONFIG']}\n")
  sys.stdout.flush()
  sys.stderr.flush()
  try:
    # exec, not a child: Slurm's signals (SIGTERM on preemption) reach the trainer directly and
    # its exit code is the task's.
    os.execvp(command[0], command)
  except OSError as e:
    sys.stderr.write(f"deploy.slurm_env: error: cannot run {command[0]!r}: {e}\n")
    return 127  # The shell's "command not found": permanent under our exit-code contract.


if __name__ == "__main__":
  _define_flags()
  app.run(main)
