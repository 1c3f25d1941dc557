"""The training log is ours: library INFO chatter is hidden unless --verbosity asks for it."""

import glob
import logging
import os
import re
import sys
import tempfile

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


# What TensorFlow's native libraries write to fd 2 while they load, before anything calls
# absl::InitializeLog: these lines bypass TF_CPP_MIN_LOG_LEVEL (tensorflow/tensorflow#100442), so
# no public switch reaches them; a start-up trick listed in trainer/startup.py, whose test
# (tests/startup_test.py) checks that every line the installed TensorFlow writes is recognised.
# INFO/WARNING lines in the native format ("I0000 00:00:<time> <tid> file.cc:N]") are notices
# (oneDNN on, no CUDA driver); errors are kept, except CUDA's failed cuInit on a machine without
# an NVIDIA driver, which every CPU machine prints and which means nothing there.
_NATIVE_PREAMBLE = "WARNING: All log messages before absl::InitializeLog() is called"
_NATIVE_NOTICE = re.compile(r"^[IW]\d{4} \d\d:\d\d:[\d.]+\s+\d+ [\w.-]+\.cc:\d+\] ")
_NATIVE_CUINIT = re.compile(r"^E\d{4} .*\bcuda_platform\.cc:\d+\] failed call to cuInit")


def load_tensorflow(verbosity: int, dev_dir: str = "/dev"):
  """Imports TensorFlow and lists its GPUs (where CUDA initialises) with fd 2 captured, then
  writes back what was captured less the native start-up notices; returns the module.

  At --verbosity=1 or more nothing is held back. The capture is a file, not a pipe read by a
  thread, so nothing written can be lost or interleaved; it ends before any training output.
  """
  if verbosity >= 1:
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    return tf
  no_driver = not glob.glob(os.path.join(glob.escape(dev_dir), "nvidia[0-9]*"))
  sys.stdout.flush()
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as captured:
    os.dup2(captured.fileno(), 2)
    try:
      import tensorflow as tf  # pylint: disable=import-outside-toplevel
      tf.config.list_physical_devices("GPU")
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      captured.seek(0)
      text = captured.read().decode("utf-8", errors="replace")
      sys.stderr.write("".join(native_lines_to_keep(text, no_driver)))
      sys.stderr.flush()
  return tf


def native_lines_to_keep(text: str, no_driver: bool) -> list:
  """The captured lines (with their newlines) that are not native start-up notices."""
  kept = []
  for line in text.splitlines(keepends=True):
    if line.startswith(_NATIVE_PREAMBLE) or _NATIVE_NOTICE.match(line):
      continue
    if no_driver and _NATIVE_CUINIT.match(line):
      continue
    kept.append(line)
  return kept
