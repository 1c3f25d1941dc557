"""Checkpoints: chief-only save location, newest-complete restore with fallback, model-shape guard."""

import collections
import logging
import os
import shutil
import tempfile

import tensorflow as tf

from trainer import errors
from trainer import storage

_VALUE_SUFFIX = "/.ATTRIBUTES/VARIABLE_VALUE"
# A checkpoint in a bucket is a folder ckpt-N/ that counts only once this marker is in it.
MARKER = "_COMPLETE"
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


def _checkpointed_variables(checkpoint) -> list:
  """Every variable the checkpoint object saves (model, optimizer, RNG states, step)."""
  return [x for x in tf.train.TrackableView(checkpoint).descendants()
          if hasattr(x, "shape") and hasattr(x, "dtype") and hasattr(x, "assign")]


def check_compatible(path: str, variables, model_dir: str) -> None:
  """Refuses a checkpoint of a different model shape before anything is restored or written.

  Compares the shapes of every stored tensor with those of the variables being restored: TF
  saves each variable once, under whichever object reaches it first.
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


def _number(name: str) -> int:
  try:
    return int(name.rstrip("/").rsplit("-", 1)[1])
  except (IndexError, ValueError):
    return -1


def push(path: str, remote_dir: str, keep_names) -> None:
  """Uploads checkpoint `path` as remote_dir/ckpt-N/, marker last; prunes what the manager dropped."""
  local_dir, prefix = os.path.split(path)
  names = [f for f in os.listdir(local_dir) if f.startswith(prefix + ".")]
  storage.upload_dir(local_dir, storage.join(remote_dir, prefix), marker=MARKER, names=names)
  for child in storage.listdir(remote_dir):
    name = child.rstrip("/")
    if _number(name) >= 0 and name not in keep_names:
      storage.rmtree(storage.join(remote_dir, name))
  logging.info("Uploaded checkpoint %s to %s", prefix, remote_dir)


def pull(remote_dir: str, local_dir: str, max_to_keep: int) -> list:
  """Downloads the newest complete checkpoints; half-uploaded ones are logged and ignored."""
  names = sorted((c.rstrip("/") for c in storage.listdir(remote_dir) if _number(c) >= 0),
                 key=_number, reverse=True)
  complete = []
  for name in names:
    remote = storage.join(remote_dir, name)
    if not storage.is_complete(remote, MARKER, verify_files=True):
      logging.warning("Ignoring %s: its upload never completed (no %s).", remote, MARKER)
      continue
    if not os.path.exists(os.path.join(local_dir, name + ".index")):
      storage.download_dir(remote, local_dir, marker=MARKER)
    complete.append(os.path.join(local_dir, name))
    if len(complete) == max_to_keep:
      break
  if complete:
    tf.compat.v1.train.update_checkpoint_state(local_dir, complete[0],
                                               all_model_checkpoint_paths=list(reversed(complete)))
  elif os.path.exists(os.path.join(local_dir, "checkpoint")):
    os.remove(os.path.join(local_dir, "checkpoint"))  # the bucket, not a stale cache, decides
  return complete


class CheckpointStore:
  """Saves where this task may write; restores from the chief's directory.

  Every worker must take part in saving (MultiWorkerMirroredStrategy requires it), but only the
  chief writes under model_dir; the others write to a private temp dir removed by close().
  """

  def __init__(self, checkpoint: tf.train.Checkpoint, chief_dir: str, is_chief: bool,
               max_to_keep: int, remote_dir: str = ""):
    self._checkpoint = checkpoint
    self.chief_dir = chief_dir
    self._remote_dir = remote_dir if storage.is_gcs(remote_dir) else ""
    self._is_chief = is_chief
    self._keep = max_to_keep
    if self._remote_dir:
      os.makedirs(chief_dir, exist_ok=True)
      pull(self._remote_dir, chief_dir, max_to_keep)
    self._temp_dir = None if is_chief else tempfile.mkdtemp(prefix="trainer-worker-ckpt-")
    save_dir = chief_dir if is_chief else self._temp_dir
    self._manager = tf.train.CheckpointManager(checkpoint, save_dir,
                                               max_to_keep=max_to_keep if is_chief else 1)

  def restore_latest(self, model_dir: str):
    """Restores the newest readable checkpoint; returns its path or None (fresh start)."""
    variables = _checkpointed_variables(self._checkpoint)
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
    path = self._manager.save(checkpoint_number=step)
    if self._remote_dir and self._is_chief:
      push(path, self._remote_dir, [os.path.basename(p) for p in self._manager.checkpoints])
    return path

  def close(self) -> None:
    if self._temp_dir:
      shutil.rmtree(self._temp_dir, ignore_errors=True)
      self._temp_dir = None
