"""Conventions shared by the entry points: help exits 0, a bad flag exits 2, the console scripts
run the modules as `python -m` does, and when an evaluator knows where the checkpoints are."""

import runpy
import sys

from absl import flags

from trainer import errors

# absl's help flags, with one or two leading dashes (absl has no -h).
_HELP_FLAGS = ("help", "?", "helpfull", "helpshort", "helpxml")
# Trainer flags that tell the side-car evaluator where the training job's checkpoints are.
CHECKPOINT_FLAGS = ("model_dir", "checkpoint_dir")
# Vertex AI gives every replica, the evaluator's included, the job's directories in these
# (deploy/README.md, "Where outputs land").
CHECKPOINT_VARIABLES = ("AIP_MODEL_DIR", "AIP_CHECKPOINT_DIR")


def parse_flags(argv):
  """absl's flag parser for app.run(flags_parser=...), with the exit codes of our contract."""
  try:
    return flags.FLAGS(argv)
  except SystemExit as e:
    # absl exits 1 after printing --help/--helpfull; asking for help is not a failure.
    if e.code == 1 and any(a.startswith("-") and a.lstrip("-").split("=")[0] in _HELP_FLAGS
                           for a in argv[1:]):
      sys.exit(errors.EXIT_OK)
    raise
  except flags.Error as e:
    sys.stderr.write(f"FATAL Flags parsing error: {e}\nPass --helpfull to see all flags.\n")
    sys.exit(errors.EXIT_CONFIG)


def evaluator_finds_checkpoints(given_flags, environ) -> bool:
  """Whether a side-car evaluator is told where the training job's checkpoints are: by one of
  CHECKPOINT_FLAGS among the names of the flags given, or by Vertex AI's variables. Without
  either it would read the default --model_dir, a relative path on its own machine that no
  trainer elsewhere writes. trainer/task.py (the evaluator itself) and trainer/launcher.py
  (before it starts one) both ask this."""
  return (bool(set(given_flags) & set(CHECKPOINT_FLAGS))
          or any(environ.get(name) for name in CHECKPOINT_VARIABLES))


def train() -> None:
  """The `mnist-train` console script: `python -m trainer.task`."""
  _run_as_main("trainer.task")


def predict() -> None:
  """The `mnist-predict` console script: `python -m trainer.predict`."""
  _run_as_main("trainer.predict")


def launch() -> None:
  """The `mnist-launch` console script: `python -m trainer.launcher`."""
  _run_as_main("trainer.launcher")


def _run_as_main(module: str) -> None:
  # What `python -m module` does: the module runs as __main__, with sys.argv[0] its file, so its
  # flags, help text and exit codes are the same (absl lists a program's flags by sys.argv[0]).
  runpy.run_module(module, run_name="__main__", alter_sys=True)
