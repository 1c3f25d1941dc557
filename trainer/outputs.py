"""Where a run's outputs go: one RunOutputs owns the dirs (local or gs://), mirrors and publishing."""

import dataclasses
import hashlib
import json
import logging
import os

from trainer.storage import fencing
from trainer.runtime import restarts
from trainer.storage import lock as run_lock
from trainer import storage

EXPORT_MARKER = "_COMPLETE"
# checkpoint_dir/final.json: the step of a finished run's last checkpoint, written by the chief
# after it (the side-car evaluator exits once it has evaluated that step).
FINAL_MARKER = "final.json"


class RunOutputs:
  """Everything about where one task's outputs go; the training loop sees only these methods.

  TensorFlow writes to local directories (the paths themselves, or a mirror of gs:// ones), and
  this object publishes them: after each checkpoint and at the end.
  """

  def __init__(self, config, training, max_job_restarts: int, task_name: str, environ,
               is_chief: bool):
    """config: the OutputsConfig; training: the TrainingConfig, whose step budget the final
    step's marker records; max_job_restarts: --max_job_restarts."""
    self.paths = resolve(config, task_name, environ)
    self._config = config
    self._training = training
    self._max_job_restarts = max_job_restarts
    self._environ = environ
    self.is_chief = is_chief
    self._locks = []
    self.summaries = None  # TensorBoard (trainer/summaries.py), from begin() on

  def prepare(self) -> None:
    """Fails before training when an output cannot be written; the chief takes the locks."""
    preflight(self.paths, self.is_chief)
    if self.is_chief:  # only the chief writes, so only it takes the locks
      # model_dir (metrics, export) and the checkpoint dir, wherever it is: two runs with
      # different model_dirs must not share one --checkpoint_dir either. Always in this order.
      self._locks.append(run_lock.acquire(self.paths.model_dir, self.paths.local_model_dir))
      self._locks.append(run_lock.acquire(self.paths.checkpoint_dir,
                                          self.paths.local_checkpoint_dir, "--checkpoint_dir"))
      for path in (self.paths.local_model_dir, self.paths.local_checkpoint_dir,
                   self.paths.local_log_dir):
        os.makedirs(path, exist_ok=True)

  def begin(self, start_step: int) -> None:
    """After the restore: clean what crashed runs left, count this start, open the summaries.

    Nothing is written before: a run refused at restore leaves model_dir as it found it.
    """
    fencing.check()  # every write of the chief asks first: trainer/storage/fencing.py
    from trainer import summaries  # pylint: disable=import-outside-toplevel  (TensorFlow)
    self.summaries = summaries.Summaries(self.paths.local_log_dir, self.is_chief)
    if self.is_chief:
      from trainer import checkpoint as checkpoint_lib  # pylint: disable=import-outside-toplevel
      checkpoint_lib.remove_crash_leftovers(self.paths.local_checkpoint_dir,
                                            self.paths.local_model_dir)
      # A finished run's marker is stale once this run may train further.
      remove_final_step(self.paths)
      restarts.record_start(self.paths.checkpoint_dir, self._max_job_restarts, start_step)

  def after_checkpoint(self, path: str) -> None:
    if self.is_chief:
      fencing.check()
      logging.info("Saved checkpoint %s", path)
      self.summaries.flush()
      publish_logs(self.paths)

  def previous_train_stats(self) -> dict:
    return previous_train_stats(self.paths)

  def export(self, eval_model, weights, image_shape, class_names=()) -> None:
    """The chief exports `weights` (a SavedModel, with the class names) and publishes it, when
    --export is on."""
    if not (self.is_chief and self._config.export):
      return
    fencing.check()  # TensorFlow writes the export, into model_dir itself when it is local
    from trainer import export  # TensorFlow's SavedModel code, only when exporting
    local_export = export.export_saved_model(
        eval_model, weights, image_shape, os.path.join(self.paths.local_model_dir, "export"),
        class_names)
    publish_export(self.paths, local_export)

  def finish(self, metrics: dict) -> None:
    """The chief's last outputs: metrics.json, the logs, hypertune; the run is then complete."""
    if not self.is_chief:
      return
    fencing.check()
    write_metrics(self.paths, metrics)
    write_final_step(self.paths, metrics["global_step"], self._training)
    self.summaries.flush()
    publish_logs(self.paths)
    report_hypertune(metrics, self._environ)
    restarts.record_finish(self.paths.checkpoint_dir)

  def close(self) -> None:
    while self._locks:
      self._locks.pop().release()


@dataclasses.dataclass(frozen=True)
class RunPaths:
  """Final locations (maybe gs://) and the local directories TensorFlow writes to first.

  TensorFlow's own gs:// file system cannot reach an emulator and is not needed: everything is
  written locally, then published through trainer.storage.
  """

  model_dir: str
  checkpoint_dir: str
  tensorboard_dir: str
  local_model_dir: str
  local_checkpoint_dir: str
  local_log_dir: str


def _with_trial(path: str, trial_id: str) -> str:
  """Hyperparameter-tuning trials must not share outputs; Vertex's AIP_* dirs already differ."""
  if not trial_id or trial_id in path.rstrip("/").split("/"):
    return path
  return storage.join(path, f"trial_{trial_id}")


def _local(path: str, mirror_root: str, name: str) -> str:
  if storage.is_gcs(path):
    return os.path.join(mirror_root, name)
  return os.path.abspath(os.path.expanduser(path))


def resolve(config, task_name: str, environ) -> RunPaths:
  """The paths of an OutputsConfig for one task (a hyperparameter-tuning trial's own)."""
  trial = environ.get("CLOUD_ML_TRIAL_ID", "")
  model_dir = _with_trial(config.model_dir, trial)
  checkpoint_dir = (_with_trial(config.checkpoint_dir, trial) if config.checkpoint_dir
                    else storage.join(model_dir, "checkpoints"))
  tensorboard_dir = (_with_trial(config.tensorboard_dir, trial) if config.tensorboard_dir
                     else storage.join(model_dir, "logs"))
  cache = storage.cache_root(environ)
  # One mirror per (run, task): workers sharing a machine must not share files.
  key = hashlib.sha256(model_dir.encode()).hexdigest()[:16]
  mirror = os.path.join(cache, key, task_name.replace(":", "-"))
  return RunPaths(model_dir=model_dir, checkpoint_dir=checkpoint_dir,
                  tensorboard_dir=tensorboard_dir,
                  local_model_dir=_local(model_dir, mirror, "model"),
                  local_checkpoint_dir=_local(checkpoint_dir, mirror, "checkpoints"),
                  local_log_dir=_local(tensorboard_dir, mirror, "logs"))


def preflight(paths: RunPaths, is_chief: bool) -> None:
  """A permanent storage problem (403, missing bucket) fails before any training.

  Each error names the flag that set the failing path.
  """
  if is_chief:
    for path, flag in _flags_of(paths).items():
      with storage.for_flag(flag):
        storage.preflight(path)
  else:
    with storage.for_flag(_flags_of(paths)[paths.checkpoint_dir]):
      storage.exists(paths.checkpoint_dir)  # read access is all a non-chief worker needs


def _flags_of(paths: RunPaths) -> dict:
  """{path: the flag it came from}; a directory derived from --model_dir is --model_dir's."""
  flags = {paths.model_dir: "--model_dir"}
  for path, flag in ((paths.checkpoint_dir, "--checkpoint_dir"),
                     (paths.tensorboard_dir, "--tensorboard_dir")):
    if not path.startswith(paths.model_dir.rstrip("/") + "/"):
      flags.setdefault(path, flag)
    else:
      flags.setdefault(path, "--model_dir")
  return flags


def publish_logs(paths: RunPaths) -> None:
  if storage.is_gcs(paths.tensorboard_dir) and os.path.isdir(paths.local_log_dir):
    storage.upload_dir(paths.local_log_dir, paths.tensorboard_dir)


def write_metrics(paths: RunPaths, metrics: dict) -> None:
  storage.write_text(storage.join(paths.model_dir, "metrics.json"),
                     json.dumps(metrics, indent=2, sort_keys=True) + "\n")


def write_final_step(paths: RunPaths, step: int, training) -> None:
  """Marks `step` as the run's last checkpoint, with the step budget (of the TrainingConfig)
  that made it the last.

  The budget (--train_steps, --epochs) tells a marker left by an earlier run with another
  budget from this run's: an evaluator may start before the chief removes it (begin()).
  """
  storage.write_text(storage.join(paths.checkpoint_dir, FINAL_MARKER), json.dumps(
      {"step": int(step), **_budget(training)}, sort_keys=True) + "\n")


def final_step(paths: RunPaths, training):
  """The finished run's last step from its marker, or None while training has not finished.

  A marker written under another step budget, or unreadable, is not this run's: None.
  """
  path = storage.join(paths.checkpoint_dir, FINAL_MARKER)
  try:
    marker = json.loads(storage.read_text(path))
  except FileNotFoundError:
    return None
  except (ValueError, UnicodeDecodeError):
    logging.warning("%s is unreadable; treating training as unfinished.", path)
    return None
  if not isinstance(marker, dict) or type(marker.get("step")) is not int:
    logging.warning("%s has no integer step; treating training as unfinished.", path)
    return None
  if {k: marker.get(k) for k in _budget(training)} != _budget(training):
    return None  # an earlier run's, with another --train_steps/--epochs
  return marker["step"]


def remove_final_step(paths: RunPaths) -> None:
  try:
    storage.remove(storage.join(paths.checkpoint_dir, FINAL_MARKER))
  except FileNotFoundError:
    pass


def _budget(training) -> dict:
  return {"train_steps": training.train_steps, "epochs": training.epochs}


def publish_export(paths: RunPaths, local_export: str) -> str:
  """Uploads the export with its completion marker last; local exports are already atomic."""
  remote = storage.join(paths.model_dir, "export")
  if storage.is_gcs(remote):
    storage.upload_dir(local_export, remote, marker=EXPORT_MARKER)
    logging.info("Published export to %s", remote)
  return remote


def report_hypertune(metrics: dict, environ) -> None:
  """Reports test accuracy for Vertex AI hyperparameter tuning, only inside a trial."""
  if not environ.get("CLOUD_ML_TRIAL_ID"):
    return
  import hypertune  # cloudml-hypertune: writes the metrics file Vertex AI reads.
  hypertune.HyperTune().report_hyperparameter_tuning_metric(
      hyperparameter_metric_tag="test_accuracy", metric_value=metrics["test_accuracy"],
      global_step=metrics["global_step"])
  logging.info("Reported test_accuracy=%.4f to hypertune", metrics["test_accuracy"])


def previous_train_stats(paths: RunPaths) -> dict:
  """The throughput figures of the run that wrote metrics.json, for a rerun that trains nothing."""
  try:
    previous = json.loads(storage.read_text(storage.join(paths.model_dir, "metrics.json")))
  except (FileNotFoundError, ValueError, UnicodeDecodeError):
    return {}
  return {k: previous[k] for k in ("train_images_per_sec", "train_seconds")
          if isinstance(previous, dict) and isinstance(previous.get(k), (int, float))}
