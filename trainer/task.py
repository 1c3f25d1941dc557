"""Entry point: `python -m trainer.task --flags` parses flags into a Config and trains."""

import atexit
import os
import sys

from absl import app
from absl import flags
from absl import logging

from trainer import cli
from trainer.runtime import cluster as cluster_lib
from trainer import config as config_lib
from trainer import errors
from trainer.runtime import gpu
from trainer import logs

# C++ INFO logs (oneDNN, CUDA probing) drown the training log; WARNING and up still show.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected positional arguments: {argv[1:]}", errors.EXIT_CONFIG)
  logs.keep_to_our_own(flags.FLAGS.verbosity)
  try:
    config = config_lib.config_from_flags()
    cluster = cluster_lib.parse_cluster(os.environ)
    cluster_lib.check_strategy(config.strategy, cluster, config.num_cpu_devices)
    gpu.check_collective_implementation(config.collective_implementation)
    if cluster.is_evaluator:
      check_evaluator_finds_checkpoints(flags.FLAGS, os.environ)
    cli.skip_plotting_imports()
    # TensorFlow loads only after flags and TF_CONFIG are good.
    logs.load_tensorflow(flags.FLAGS.verbosity)
    if cluster.is_evaluator:
      from trainer import evaluator  # pylint: disable=import-outside-toplevel
      evaluator.run(config)
      return
    from trainer import train  # pylint: disable=import-outside-toplevel
    train.train_and_evaluate(config)
  except errors.TrainerError as e:
    logging.error("%s: %s", type(e).__name__, e)
    sys.stderr.write(f"FATAL {type(e).__name__}: {e}\n")
    sys.stderr.flush()
    if isinstance(e, errors.RetryableError):
      # TF's collective threads may still wait on a dead peer; interpreter teardown would
      # join them and hang, so leave at once.
      logging.flush()
      os._exit(e.exit_code)
    sys.exit(e.exit_code)
  exit_without_teardown(0)


def exit_without_teardown(code: int) -> None:
  """Leaves at once: every output is written and closed when train_and_evaluate returns, and
  the interpreter's teardown of TensorFlow's runtime only adds a second to every run's wall
  time (bench/README.md). The atexit handlers still run (autograph deletes its generated
  temporary files in one)."""
  atexit._run_exitfuncs()  # pylint: disable=protected-access
  logging.flush()
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)


def check_evaluator_finds_checkpoints(flag_values, environ) -> None:
  """The evaluator reads the training job's checkpoints, so it must be told where they are: the
  default --model_dir is a relative path on this machine, which no trainer elsewhere writes."""
  if any(flag_values[name].present for name in ("model_dir", "checkpoint_dir")):
    return
  if any(environ.get(name) for name in ("AIP_MODEL_DIR", "AIP_CHECKPOINT_DIR")):
    return  # Vertex AI gives every replica, the evaluator's included, the job's directories
  raise errors.ConfigError(
      "TF_CONFIG makes this process the evaluator, but it has no checkpoint dir: pass the "
      "training job's --model_dir (or --checkpoint_dir), the same flags as its workers.")


if __name__ == "__main__":
  config_lib.define_flags()  # flags exist only in the entry point that is running
  flags.adopt_module_key_flags(config_lib)  # --help lists them, not only --helpfull
  app.run(main, flags_parser=cli.parse_flags)
