"""Entry point: `python -m trainer.task --flags` (or `mnist-train`) parses flags into a Config
and trains, or evaluates as the side-car evaluator."""

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
from trainer import startup


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected positional arguments: {argv[1:]}", errors.EXIT_CONFIG)
  logs.keep_to_our_own(flags.FLAGS.verbosity)
  try:
    config = config_lib.config_from_flags()
    cluster = cluster_lib.parse_cluster(os.environ)
    cluster_lib.check_strategy(config.runtime.strategy, cluster, config.runtime.num_cpu_devices)
    gpu.check_collective_implementation(config.runtime.collective_implementation)
    if cluster.is_evaluator:
      check_evaluator_finds_checkpoints(flags.FLAGS, os.environ)
    startup.skip_plotting_imports()
    # TensorFlow loads only after flags and TF_CONFIG are good.
    logs.load_tensorflow(flags.FLAGS.verbosity)
    if cluster.is_evaluator:
      from trainer import evaluator  # pylint: disable=import-outside-toplevel
      evaluator.run(config)
      return
    from trainer import train  # pylint: disable=import-outside-toplevel
    train.train_and_evaluate(config, cluster=cluster)
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
  startup.exit_without_teardown(0)


def check_evaluator_finds_checkpoints(flag_values, environ) -> None:
  """The evaluator reads the training job's checkpoints, so it must be told where they are
  (cli.evaluator_finds_checkpoints)."""
  given = [name for name in cli.CHECKPOINT_FLAGS if flag_values[name].present]
  if not cli.evaluator_finds_checkpoints(given, environ):
    raise errors.ConfigError(
        "TF_CONFIG makes this process the evaluator, but it has no checkpoint dir: pass the "
        "training job's --model_dir (or --checkpoint_dir), the same flags as its workers.")


if __name__ == "__main__":
  startup.set_tensorflow_environment()  # before anything can load TensorFlow
  config_lib.define_flags()  # flags exist only in the entry point that is running
  flags.adopt_module_key_flags(config_lib)  # --help lists them, not only --helpfull
  app.run(main, flags_parser=cli.parse_flags)
