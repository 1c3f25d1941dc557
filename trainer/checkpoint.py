"""Checkpoints: chief-only save location, newest-complete restore with fallback, model-shape guard."""

import collections
import logging
import os
import shutil
import tempfile

import tensorflow as tf

from trainer import errors

_VALUE_SUFFIX = "/.ATTRIBUTES/VARIABLE_VALUE"
# What a torn, truncated or bit-flipped checkpoint raises on restore.
_CORRUPT_ERRORS = (tf.errors.DataLossError, tf.errors.NotFoundError, tf.errors.OutOfRangeError,
                   tf.errors.InvalidArgumentError, tf.errors.InternalError)


def candidates(checkpoint_dir: str) -> list:
  """Checkpoint prefixes in checkpoint_dir, newest first, that have an index file."""
  state = tf.train.get_checkpoint_state(checkpoint_dir)
  if state is None:
    return []
  paths = list(state.all_model_checkpoint_paths) or [state.model_checkpoint_path]
  found = []
  for path in reversed(paths):
    if not os.path.isabs(path):
      path = os.path.join(checkpoint_dir, path)
    if tf.io.gfile.exists(path + ".index"):
      found.append(path)
    else:
      logging.warning("Checkpoint %s has no index file (torn write); skipping it.", path)
  return found


def _shape_counts(shapes) -> collections.Counter:
  # Scalars (step counters, learning rate) say nothing about the architecture.
  return collections.Counter(tuple(s) for s in shapes if len(s))


def check_compatible(path: str, variables, model_dir: str) -> None:
  """Refuses a checkpoint of a different model shape before anything is restored or written.

  Compares the shapes of every stored tensor with those of the objects being restored (model
  and optimizer): TF saves each variable once, under whichever object reaches it first.
  """
  try:
    stored = [shape for name, shape in tf.train.list_variables(path)
              if name.endswith(_VALUE_SUFFIX)]
  except _CORRUPT_ERRORS:
    return  # Unreadable: restore() treats it as corrupt and falls back.
  unique = {id(v): v for v in variables}.values()
  expected = [v.shape.as_list() for v in unique]
  if _shape_counts(stored) != _shape_counts(expected):
    raise errors.IncompatibleCheckpointError(
        f"--model_dir={model_dir} holds a checkpoint of a different model ({path}: "
        f"{len(stored)} tensors, this model and its optimizer have {len(expected)} or other "
        "shapes). It was left untouched: use a new --model_dir, or the flags that built it.")


class CheckpointStore:
  """Saves where this task may write; restores from the chief's directory.

  Every worker must take part in saving (MultiWorkerMirroredStrategy requires it), but only the
  chief writes under model_dir; the others write to a private temp dir removed by close().
  """

  def __init__(self, checkpoint: tf.train.Checkpoint, chief_dir: str, is_chief: bool,
               max_to_keep: int):
    self._checkpoint = checkpoint
    self.chief_dir = chief_dir
    self._temp_dir = None if is_chief else tempfile.mkdtemp(prefix="trainer-worker-ckpt-")
    save_dir = chief_dir if is_chief else self._temp_dir
    self._manager = tf.train.CheckpointManager(checkpoint, save_dir,
                                               max_to_keep=max_to_keep if is_chief else 1)

  def restore_latest(self, variables, model_dir: str):
    """Restores the newest readable checkpoint; returns its path or None (fresh start)."""
    for path in candidates(self.chief_dir):
      check_compatible(path, variables, model_dir)
      try:
        self._checkpoint.restore(path).assert_existing_objects_matched()
      except _CORRUPT_ERRORS as e:
        logging.error("Checkpoint %s is corrupt (%s: %s); falling back to the previous one.",
                      path, type(e).__name__, str(e).splitlines()[0][:200])
        continue
      except (ValueError, AssertionError) as e:
        raise errors.IncompatibleCheckpointError(
            f"--model_dir={model_dir}: checkpoint {path} does not match this model ({e}). It was "
            "left untouched: use a new --model_dir.") from None
      logging.info("Restored %s", path)
      return path
    return None

  def save(self, step: int) -> str:
    return self._manager.save(checkpoint_number=step)

  def close(self) -> None:
    if self._temp_dir:
      shutil.rmtree(self._temp_dir, ignore_errors=True)
      self._temp_dir = None
