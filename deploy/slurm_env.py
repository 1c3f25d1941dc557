"""Builds TF_CONFIG from the Slurm step environment, then execs the trainer command in its place.

Usage, one task per node (see deploy/slurm/train.sbatch):
  srun python -m deploy.slurm_env [--port_base=P] -- python -m trainer.task --flags...
"""

import json
import os
import sys
from typing import Optional, Sequence

from absl import app
from absl import flags


class SlurmEnvError(RuntimeError):
  """Not inside a Slurm step, or an environment the resolver cannot turn into a cluster."""


def tf_config(port_base: int = 8888) -> dict:
  """TF_CONFIG for this task: every task of the step is a 'worker', index = SLURM_PROCID.

  TensorFlow's resolver reads SLURM_PROCID, SLURM_STEP_NUM_TASKS, SLURM_STEP_NODELIST and
  SLURM_STEP_TASKS_PER_NODE from os.environ and expands the hostlist itself (no scontrol).
  """
  import tensorflow as tf  # Loaded here so a bad command line fails before TensorFlow starts.
  try:
    num_tasks = int(os.environ["SLURM_STEP_NUM_TASKS"])
  except (KeyError, ValueError):
    raise SlurmEnvError("SLURM_STEP_NUM_TASKS is missing or not a number: run this under "
                        "srun inside an allocation.") from None
  try:
    # GPUs are Slurm's business (--gpus-per-node binds them to the task), so the resolver must
    # not rewrite CUDA_VISIBLE_DEVICES nor run nvidia-smi. It still pairs ports with "GPU slots"
    # and drops tasks beyond gpus_per_node/gpus_per_task, so give one slot per possible task.
    resolver = tf.distribute.cluster_resolver.SlurmClusterResolver(
        port_base=port_base, gpus_per_node=num_tasks, gpus_per_task=1, auto_set_gpu=False)
    cluster = resolver.cluster_spec().as_dict()
    task_type, task_index = resolver.get_task_info()
  except (RuntimeError, ValueError) as e:
    raise SlurmEnvError(f"Cannot build the cluster from the Slurm environment: {e}") from None
  return {"cluster": cluster, "task": {"type": task_type, "index": task_index}}


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
