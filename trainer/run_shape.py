"""A run's shape: what the order of its examples depends on. Recorded beside the checkpoints
(checkpoint_dir/run_shape.json, by trainer/checkpoint.py); a resumed run is held to it."""

import logging

from trainer import errors

SHAPE_FILE = "run_shape.json"
# A resumed run with another value of one of these would replay or skip examples (docs/data.md,
# "Resume guarantee"): refused. The worker and pipeline counts may change (a shrunken or
# regrown cluster): in memory the order does not depend on them; in stream mode it does, and
# the run goes on with a warning.
FIXED = ("dataset", "input_mode", "global_batch_size", "seed", "train_examples",
         "shuffle_buffer")
_MAY_CHANGE = ("num_workers", "input_pipelines", "record_files")


def of(data, training, num_workers: int, stream_pipelines: int = 0,
       record_files: int = 0) -> dict:
  """The shape of a run (data.train_dataset_fn, stream.plan_epoch) from its DataConfig and
  TrainingConfig: stream_pipelines and record_files are stream mode's (0: in memory)."""
  shape = {"dataset": data.dataset, "input_mode": "stream" if stream_pipelines else "in_memory",
           "global_batch_size": training.global_batch_size, "seed": training.seed,
           "train_examples": data.train_examples, "num_workers": num_workers}
  if stream_pipelines:
    shape.update(shuffle_buffer=data.shuffle_buffer, input_pipelines=stream_pipelines,
                 record_files=record_files)
  return shape


def check(shape: dict, recorded: dict, checkpoint_dir: str) -> None:
  """A different value of a FIXED entry than the checkpoints' `recorded` shape is a ConfigError
  naming the flag, the recorded value and the ways on; other changes are logged."""
  for key in FIXED:
    if key in recorded and recorded[key] != shape.get(key):
      raise errors.ConfigError(_shape_changed(key, shape, recorded, checkpoint_dir))
  changed = [k for k in _MAY_CHANGE if k in recorded and recorded[k] != shape.get(k)]
  if changed and shape["input_mode"] == "stream":
    logging.warning(
        "Resuming stream-mode checkpoints with %s: the order of examples depends on these, so "
        "the rest of the current epoch may repeat or skip some examples; every later epoch "
        "reads each example once again.", _changes(changed, shape, recorded))
  elif changed:
    logging.info("Resuming with %s: the same global batch, so the same order of examples "
                 "(in memory it does not depend on the workers).",
                 _changes(changed, shape, recorded))


def _shape_changed(key: str, shape: dict, recorded: dict, checkpoint_dir: str) -> str:
  value, before = shape.get(key), recorded[key]
  # --input_mode=auto resolves to a mode: name the mode it took.
  given = f"--input_mode (here {value})" if key == "input_mode" else f"--{key}={value}"
  return (f"{given} differs from the {key} the checkpoints in {checkpoint_dir} were trained "
          f"with ({before}): resuming would replay or skip examples, breaking the exactly-once "
          f"guarantee. Resume with --{key}={before}, or start afresh: --restart_from_scratch "
          "(moves the checkpoints aside) or a new --model_dir.")


def _changes(keys, shape: dict, recorded: dict) -> str:
  return ", ".join(f"{k.replace('_', ' ')} {shape.get(k)} (the checkpoints': {recorded[k]})"
                   for k in keys)
