"""Checkpoints: found from their files, verified before restore, saved by the chief, never lost."""

import collections
import glob
import json
import logging
import os
import re
import shutil
import tempfile
import time

import tensorflow as tf

from trainer import errors
from trainer import run_shape
from trainer.storage import fencing
from trainer import storage

# A checkpoint in a bucket is a folder ckpt-N/ that counts only once this marker is in it.
MARKER = "_COMPLETE"
STATE_FILE = "checkpoint"  # TensorFlow's own index of checkpoints: a hint, never the authority
_INDEX = re.compile(r"^ckpt-(\d+)\.index$")
_DATA = re.compile(r"^ckpt-(\d+)\.data-(\d+)-of-(\d+)$")
_VALUE_SUFFIX = "/.ATTRIBUTES/VARIABLE_VALUE"
# The private checkpoint dirs of non-chief workers: <prefix><pid>-<random>.
_WORKER_TEMP_PREFIX = "trainer-worker-ckpt-"

class CheckpointStore:
  """Finds, verifies and restores the newest good checkpoint; saves where this task may write.

  Every worker must take part in saving (MultiWorkerMirroredStrategy requires it), but only the
  chief writes under the checkpoint dir; the others write to a private temp dir removed by
  close(). The files decide what exists: TensorFlow's state file is rewritten from them.
  """

  def __init__(self, checkpoint: tf.train.Checkpoint, chief_dir: str, is_chief: bool,
               max_to_keep: int, remote_dir: str = ""):
    self._checkpoint = checkpoint
    self.chief_dir = chief_dir
    self._remote_dir = remote_dir if storage.is_gcs(remote_dir) else ""
    self._is_chief = is_chief
    self._keep = max_to_keep
    self._manager = None
    self._temp_dir = None
    self._restored = None
    if self._remote_dir:
      storage.check_cache_writable(f"the local mirror of {remote_dir}")
      os.makedirs(chief_dir, exist_ok=True)
      pull(self._remote_dir, chief_dir, max_to_keep)

  def restore_latest(self, model_dir: str, restart_from_scratch: bool = False):
    """Restores the newest checkpoint that verifies; returns its path, or None for step 0.

    Falls back past damaged checkpoints, one log line each. When checkpoint files exist but
    none can be restored, raises DataError and leaves every file as it was, unless
    restart_from_scratch, which moves them aside first.
    """
    found = complete_checkpoints(self.chief_dir)
    logging.info("Checkpoints found in %s: %s", self.chief_dir,
                 ", ".join(os.path.basename(p) for p in found) or "none")
    if restart_from_scratch:
      if self._is_chief:
        set_aside(self.chief_dir)
      self._open_manager([])
      return None
    variables = _checkpointed_variables(self._checkpoint)
    damaged = []
    for path in found:
      problem = damage(path)
      if problem:
        logging.error("%s; falling back to the previous checkpoint.", problem)
        damaged.append(path)
        continue
      check_compatible(path, variables, model_dir)
      try:
        self._checkpoint.restore(path).assert_existing_objects_matched()
      except (ValueError, AssertionError) as e:
        raise errors.IncompatibleCheckpointError(
            f"--model_dir={model_dir}: checkpoint {path} does not match this model ({e}). It was "
            "left untouched: use a new --model_dir.") from None
      logging.info("Restored %s", path)
      self._open_manager([p for p in reversed(found) if p not in damaged
                          and _number(p) <= _number(path)])
      self._restored = path
      return path
    leftovers = checkpoint_files(self.chief_dir)
    if leftovers:
      raise errors.DataError(
          f"No checkpoint in {self.chief_dir} can be restored ({len(leftovers)} checkpoint "
          f"file(s), e.g. {os.path.basename(leftovers[0])}; see the errors above), and training "
          "from step 0 would overwrite them. Every file was left as it was. Restore the "
          "checkpoints, or rerun with --restart_from_scratch (moves them into a discarded-* "
          "folder) or another --model_dir.")
    self._open_manager([])
    return None

  def check_run_shape(self, shape: dict) -> None:
    """Holds a resumed run to the run shape (trainer/run_shape.py) its checkpoints were
    trained with; the chief then records this run's (a run from step 0 records its own).
    Other workers read the record too, so every worker refuses alike. Call after
    restore_latest.
    """
    path = storage.join(self._remote_dir or self.chief_dir, run_shape.SHAPE_FILE)
    recorded = storage.read_json(path, {}) if self._restored else {}
    if not isinstance(recorded, dict):
      recorded = {}
    run_shape.check(shape, recorded, self.chief_dir)
    if self._restored and not recorded:
      logging.info("No %s beside %s (written by an older version): recording this run's.",
                   run_shape.SHAPE_FILE, self._restored)
    if self._is_chief and recorded != shape:
      storage.write_text(path, json.dumps(shape, indent=1, sort_keys=True) + "\n")

  def save(self, step: int) -> str:
    """Saves step's checkpoint; a full disk is a StorageError naming the path."""
    if self._is_chief:
      fencing.check()  # a chief that lost its run lock writes no more checkpoints (exit 2)
    try:
      path = self._manager.save(checkpoint_number=step)
    except (tf.errors.OpError, OSError) as e:
      if errors.is_disk_full(e):
        raise errors.StorageError(
            f"No space left on the device of {self._manager.directory} while saving the "
            f"checkpoint of step {step}. The previous checkpoints are intact: free space (or "
            "lower --keep_checkpoints), then rerun the same command to resume.") from None
      raise
    if self._remote_dir and self._is_chief:
      push(path, self._remote_dir, [os.path.basename(p) for p in self._manager.checkpoints])
    return path

  def close(self) -> None:
    if self._temp_dir:
      shutil.rmtree(self._temp_dir, ignore_errors=True)
      self._temp_dir = None

  def _open_manager(self, good: list) -> None:
    """The CheckpointManager, after the chief rewrote the state file from the good files."""
    if self._is_chief:
      write_state(self.chief_dir, good)
      save_dir, keep = self.chief_dir, self._keep
    else:
      remove_stale_worker_dirs(tempfile.gettempdir())
      self._temp_dir = tempfile.mkdtemp(prefix=f"{_WORKER_TEMP_PREFIX}{os.getpid()}-")
      save_dir, keep = self._temp_dir, 1
    self._manager = tf.train.CheckpointManager(self._checkpoint, save_dir, max_to_keep=keep)


def complete_checkpoints(checkpoint_dir: str) -> list:
  """Prefixes of every ckpt-N in checkpoint_dir with an index and all its data shards, newest first.

  The files are the authority: a state file that is missing, empty, garbage or stale changes
  nothing here. A checkpoint missing a file is logged and skipped.
  """
  try:
    names = set(os.listdir(checkpoint_dir))
  except FileNotFoundError:
    return []
  numbers = {int(m.group(1)) for m in map(_INDEX.match, names) if m}
  numbers |= {int(m.group(1)) for m in map(_DATA.match, names) if m}
  found = []
  for number in sorted(numbers, reverse=True):
    prefix = os.path.join(checkpoint_dir, f"ckpt-{number}")
    missing = _missing_files(prefix, names)
    if missing:
      logging.warning("Checkpoint %s is incomplete (no %s: a torn write); skipping it.", prefix,
                      missing)
    else:
      found.append(prefix)
  return found


def _missing_files(prefix: str, names: set) -> str:
  base = os.path.basename(prefix)
  if base + ".index" not in names:
    return base + ".index"
  shards = [m for m in map(_DATA.match, names) if m and f"ckpt-{m.group(1)}" == base]
  if not shards:
    return base + ".data-*"
  total = int(shards[0].group(3))
  for i in range(total):
    name = f"{base}.data-{i:05d}-of-{total:05d}"
    if name not in names:
      return name
  return ""


def damage(prefix: str) -> str:
  """'' when every tensor of the checkpoint reads back with its checksum, else what is damaged.

  Reading everything once before restoring costs one extra read of the checkpoint, and turns
  every kind of damage (truncation, zero length, flipped bits, a torn index) into one message
  naming the file, instead of a TensorFlow error that a restore raises at an unknown point.
  """
  index = prefix + ".index"
  data_files = sorted(glob.glob(glob.escape(prefix) + ".data-*"))
  for path in [index] + data_files:
    if os.path.getsize(path) == 0:
      return f"Checkpoint file {path} is damaged (zero length)"
  try:
    reader = tf.train.load_checkpoint(prefix)
  except Exception as e:  # pylint: disable=broad-except
    return f"Checkpoint file {index} is damaged ({_first_line(e)})"
  try:
    for name in reader.get_variable_to_shape_map():
      reader.get_tensor(name)
  except Exception as e:  # pylint: disable=broad-except
    # TF's reader raises IndexError, DataLossError or others; all mean unreadable bytes.
    return f"Checkpoint file {', '.join(data_files)} is damaged ({_first_line(e)})"
  return ""


def checkpoint_files(checkpoint_dir: str) -> list:
  """Every ckpt-N index or data file in checkpoint_dir, sorted."""
  try:
    names = os.listdir(checkpoint_dir)
  except FileNotFoundError:
    return []
  return sorted(os.path.join(checkpoint_dir, n) for n in names if _INDEX.match(n) or _DATA.match(n))


def write_state(checkpoint_dir: str, good: list) -> None:
  """Rewrites TensorFlow's state file to list exactly `good` (oldest first), or removes it."""
  state = os.path.join(checkpoint_dir, STATE_FILE)
  if not good:
    if os.path.exists(state):
      os.remove(state)
    return
  os.makedirs(checkpoint_dir, exist_ok=True)
  tf.compat.v1.train.update_checkpoint_state(
      checkpoint_dir, good[-1], all_model_checkpoint_paths=[os.path.basename(p) for p in good])


def set_aside(checkpoint_dir: str) -> str:
  """Moves every checkpoint file and the state file into checkpoint_dir/discarded-<time>/."""
  moving = checkpoint_files(checkpoint_dir)
  if os.path.exists(os.path.join(checkpoint_dir, STATE_FILE)):
    moving.append(os.path.join(checkpoint_dir, STATE_FILE))
  if not moving:
    return ""
  target = os.path.join(checkpoint_dir, time.strftime("discarded-%Y%m%d-%H%M%S"))
  os.makedirs(target, exist_ok=True)
  for path in moving:
    os.replace(path, os.path.join(target, os.path.basename(path)))
  logging.warning("--restart_from_scratch: moved %d checkpoint file(s) into %s.", len(moving),
                  target)
  return target


def remove_crash_leftovers(checkpoint_dir: str, model_dir: str) -> list:
  """Deletes what a killed run leaves behind: ckpt-N_temp/ dirs and unfinished .export-* dirs."""
  leftovers = glob.glob(os.path.join(glob.escape(checkpoint_dir), "ckpt-*_temp"))
  leftovers += glob.glob(os.path.join(glob.escape(model_dir), ".export-*"))
  for path in leftovers:
    shutil.rmtree(path, ignore_errors=True)
    logging.info("Removed %s, left by an interrupted run.", path)
  return leftovers


def remove_stale_worker_dirs(temp_root: str) -> list:
  """Deletes the private checkpoint dirs of non-chief workers on this host that have died."""
  removed = []
  for path in glob.glob(os.path.join(glob.escape(temp_root), _WORKER_TEMP_PREFIX + "*")):
    pid = os.path.basename(path)[len(_WORKER_TEMP_PREFIX):].split("-", 1)[0]
    if pid.isdigit() and not _pid_alive(int(pid)):
      shutil.rmtree(path, ignore_errors=True)
      removed.append(path)
  return removed


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def _first_line(e: Exception) -> str:
  return f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"


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
  stored = [shape for name, shape in tf.train.list_variables(path)
            if name.endswith(_VALUE_SUFFIX)]
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
  """Makes local_dir hold exactly the bucket's newest complete checkpoints, downloaded anew.

  The bucket decides: local checkpoint files are deleted first, because a bucket that was
  emptied and retrained on this host can hold other bytes under the same ckpt-N names.
  Half-uploaded checkpoints (no marker) are logged and ignored.
  """
  for path in checkpoint_files(local_dir):
    os.remove(path)
  names = sorted((c.rstrip("/") for c in storage.listdir(remote_dir) if _number(c) >= 0),
                 key=_number, reverse=True)
  complete = []
  for name in names:
    remote = storage.join(remote_dir, name)
    if not storage.is_complete(remote, MARKER, verify_files=True):
      logging.warning("Ignoring %s: its upload never completed (no %s).", remote, MARKER)
      continue
    storage.download_dir(remote, local_dir, marker=MARKER)
    complete.append(os.path.join(local_dir, name))
    if len(complete) == max_to_keep:
      break
  marker = os.path.join(local_dir, MARKER)
  if os.path.exists(marker):
    os.remove(marker)  # every download leaves one; it describes a folder, not this mirror
  write_state(local_dir, list(reversed(complete)))
  return complete
