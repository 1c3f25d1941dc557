"""The training log is ours: library INFO chatter is hidden unless --verbosity asks for it."""

import logging
import os

from absl import logging as absl_logging

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def keep_to_our_own(verbosity: int) -> None:
  """At the default verbosity (0), INFO lines from other packages (tf.distribute's reduce
  notices, TFDS's reader, the SavedModel builder) are dropped; warnings and errors always show.
  --verbosity=1 or more brings everything back."""
  if verbosity >= 1:
    return
  absl_logging.get_absl_handler().addFilter(_ours_or_important)


def _ours_or_important(record: logging.LogRecord) -> bool:
  return record.levelno >= logging.WARNING or record.pathname.startswith(_PACKAGE_DIR)


def verbose() -> bool:
  """True when the user asked for library chatter (--verbosity >= 1, i.e. DEBUG is on)."""
  return logging.getLogger().isEnabledFor(logging.DEBUG)
