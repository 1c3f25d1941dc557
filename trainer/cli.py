"""Command-line conventions shared by the entry points: help exits 0, a bad flag exits 2, no plotting imports."""

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
  """Keeps matplotlib's pyplot out of the process: Keras, which `import tensorflow` loads,
  imports it when it is installed (keras/src/visualization/plot_image_gallery.py, guarded by
  `except ImportError`) for plotting helpers the trainer never calls, and it costs ~0.3 s of
  every start-up. A None entry in sys.modules makes that import fail at once. Call it in an entry
  point, before TensorFlow loads; a process that already has pyplot keeps it."""
  sys.modules.setdefault("matplotlib.pyplot", None)
