"""Conventions shared by the entry points: help exits 0, a bad flag exits 2, no plotting."""

import sys

from absl import flags

from trainer import errors

# absl's help flags, with one or two leading dashes (absl has no -h).
_HELP_FLAGS = ("help", "?", "helpfull", "helpshort", "helpxml")


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


def skip_plotting_imports() -> None:
  """Keeps matplotlib out of the process: Keras, which `import tensorflow` loads, imports pyplot
  and matplotlib.patches when they are installed (keras/src/visualization/, each guarded by
  `except ImportError`) for plotting helpers the trainer never calls; that cost ~0.3 s of every
  start-up. A None entry in sys.modules makes those imports fail at once. Call it in an entry
  point, before TensorFlow loads; a process that already has matplotlib keeps it."""
  sys.modules.setdefault("matplotlib", None)
