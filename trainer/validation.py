"""Validation of a Config as a table of rules: each names its flag and the fix (exit 2).

It reads a config's groups by attribute and its fields by flag name, and imports no config
module, so trainer/config.py imports it one way.
"""

import dataclasses
import math
from typing import Callable, Optional

from trainer import errors

STRATEGIES = ("auto", "one_device", "mirrored", "multi_worker_mirrored")
COLLECTIVES = ("auto", "ring", "nccl")
INPUT_MODES = ("auto", "in_memory", "stream")
LR_SCHEDULES = ("onecycle", "cosine", "constant")
LR_SCALINGS = ("linear", "none")
PADDINGS = ("same", "valid")
PRECISIONS = ("auto", "float32", "mixed")
# Python's timers overflow far below float's range; a week is longer than any real wait.
_MAX_WAIT_S = 7 * 24 * 3600.0
# Keeps epochs x steps per epoch an integer TensorFlow's int64 step counter holds.
_MAX_EPOCHS = 1e6
# A 1024x1024 RGB image is 12 MiB as float32, a batch of 256 of them 3 GiB before the first
# layer: larger images are no job for this CNN (resize them down).
MAX_IMAGE_SIZE = 1024


# ---- Validation: a table of rules, each naming its flag and the fix. ----


@dataclasses.dataclass(frozen=True)
class Rule:
  """`check(value)` must hold for the field `name`; else the message (a format string of name
  and value) names the flag and the fix."""

  name: str
  check: Callable
  message: str


def _positive(name):
  return Rule(name, lambda v: v > 0, "--{name} must be > 0, got {value}.")  # NaN fails too


def _non_negative(name):
  return Rule(name, lambda v: v >= 0, "--{name} must be >= 0, got {value}.")


def _fraction(name):
  return Rule(name, lambda v: 0.0 <= v < 1.0, "--{name} must be in [0, 1), got {value}.")


def _at_most_a_week(name):
  return Rule(name, lambda v: v <= _MAX_WAIT_S,
              "--{name} must be at most %.0f (a week), got {value}." % _MAX_WAIT_S)


def _one_of(name, choices):
  return Rule(name, lambda v: v in choices, "--{name}={value!r}: use one of %s." % ", ".join(choices))


RULES = (
    Rule("model_dir", bool, "--model_dir is empty: give a local path or a gs:// URI."),
    Rule("dataset", bool, "--dataset is empty: use e.g. --dataset=mnist."),
    Rule("image_size", lambda v: 0 <= v <= MAX_IMAGE_SIZE,
         "--image_size must be in [0, %d] (0: keep the images' size; a larger size does not fit "
         "a training batch in memory), got {value}: resize to at most %d, e.g. --image_size=224."
         % (MAX_IMAGE_SIZE, MAX_IMAGE_SIZE)),
    Rule("eval_fraction", lambda v: 0.0 < v < 1.0,
         "--eval_fraction must be in (0, 1), e.g. 0.1, got {value}."),
    _positive("global_batch_size"),
    *(_positive(n) for n in (
        "learning_rate", "reference_batch_size", "checkpoint_every_steps", "keep_checkpoints",
        "log_every_steps", "summary_every_steps", "steps_per_loop", "collective_timeout_s",
        "preemption_grace_s")),
    Rule("evaluator_timeout_s", lambda v: v > 0,
         "--evaluator_timeout_s must be > 0, got {value}: give the seconds the evaluator waits "
         "for a new checkpoint before it exits 143 (default 3600), longer than the gap between "
         "two checkpoints."),
    *(_at_most_a_week(n) for n in ("collective_timeout_s", "preemption_grace_s",
                                   "evaluator_timeout_s")),
    *(_non_negative(n) for n in (
        "num_cpu_devices", "warmup_steps", "eval_every_steps", "first_eval_step",
        "train_examples", "eval_examples", "inject_nan_at_step", "max_job_restarts",
        "num_shards")),
    _fraction("dropout"),
    _fraction("label_smoothing"),
    _non_negative("weight_decay"),
    _one_of("strategy", STRATEGIES),
    _one_of("lr_schedule", LR_SCHEDULES),
    _one_of("lr_scaling", LR_SCALINGS),
    Rule("model_widths", lambda v: bool(v) and all(w > 0 for w in v),
         "--model_widths must be positive integers, got {value}."),
    _positive("space_to_depth"),
    _positive("in_memory_limit_mb"),
    _positive("shuffle_buffer"),
    _one_of("input_mode", INPUT_MODES),
    _one_of("precision", PRECISIONS),
    _one_of("conv_padding", PADDINGS),
    _fraction("adam_beta1"),
    _fraction("adam_beta2"),
    _one_of("collective_implementation", COLLECTIVES),
    Rule("bytes_per_pack", lambda v: v >= 0,
         "--bytes_per_pack must be >= 0 (0: TensorFlow's choice), got {value}."),
)


def validate(c) -> None:
  """Rejects bad or contradictory values with a message naming the flag and the fix."""
  values = c.flat()
  for name, value in values.items():
    # NaN passes every comparison and a NaN timeout never fires: no float may be non-finite.
    if isinstance(value, float) and not math.isfinite(value):
      raise errors.ConfigError(f"--{name} must be a finite number, got {value}.")
  for rule in RULES[:2]:  # in the order the flags' checks always ran
    _apply(rule, values)
  _dataset_names_a_folder(c)
  for rule in RULES[2:5]:
    _apply(rule, values)
  _length(c)
  for rule in RULES[5:]:
    _apply(rule, values)
  _one_size_per_block(c)
  _subset_needs_memory(c)
  _cpu_devices_need_mirrored(c)
  profile_range(c.training)


def _apply(rule: Rule, values: dict) -> None:
  if not rule.check(values[rule.name]):
    raise errors.ConfigError(rule.message.format(name=rule.name, value=values[rule.name]))


def _dataset_names_a_folder(c) -> None:
  dataset = c.data.dataset
  if dataset.startswith("image_folder:") and not dataset[len("image_folder:"):].strip():
    raise errors.ConfigError(
        f"--dataset={dataset} names no folder: use --dataset=image_folder:DIR (local or "
        "gs://), DIR holding one sub-folder of JPEG/PNG images per class.")


def _length(c) -> None:
  t = c.training
  if t.train_steps is None and t.epochs is None:
    raise errors.ConfigError("Set --train_steps or --epochs.")
  if t.train_steps is not None and not t.train_steps > 0:
    raise errors.ConfigError(f"--train_steps must be > 0, got {t.train_steps}.")
  if t.epochs is not None:
    if not t.epochs > 0:
      raise errors.ConfigError(f"--epochs must be > 0, got {t.epochs}.")
    if t.epochs > _MAX_EPOCHS:
      raise errors.ConfigError(f"--epochs must be at most {_MAX_EPOCHS:g}, got {t.epochs:g}; "
                               "for longer runs set --train_steps.")


def _one_size_per_block(c) -> None:
  m = c.model
  for name, what in (("kernel_sizes", "size"), ("pool_sizes", "size")):
    sizes = getattr(m, name)
    if len(sizes) != len(m.model_widths) or any(s <= 0 for s in sizes):
      raise errors.ConfigError(
          f"--{name}={','.join(map(str, sizes))} must give one positive {what} per "
          f"--model_widths entry ({len(m.model_widths)})"
          + ("; 1 means no pooling." if name == "pool_sizes" else "."))


def _subset_needs_memory(c) -> None:
  if c.data.input_mode == "stream" and c.data.train_examples:
    raise errors.ConfigError(
        "--train_examples takes a subset of a split held in memory: use it with "
        "--input_mode=in_memory, or drop it to stream the whole split.")


def _cpu_devices_need_mirrored(c) -> None:
  r = c.runtime
  if r.num_cpu_devices > 1 and r.strategy in ("one_device", "multi_worker_mirrored"):
    raise errors.ConfigError(
        f"--num_cpu_devices={r.num_cpu_devices} contradicts --strategy={r.strategy}: "
        "logical CPU devices are for --strategy=mirrored (or auto).")


def profile_range(t) -> Optional[tuple]:
  """--profile_steps as (START, END), steps counted from 1, both profiled; None when empty."""
  if not t.profile_steps:
    return None
  try:
    start, end = (int(part) for part in t.profile_steps.split(","))
  except ValueError:
    raise errors.ConfigError(
        f"--profile_steps={t.profile_steps!r} must be two integers START,END (e.g. 20,25: "
        "steps 20 to 25), or empty for no profile.") from None
  if start < 1 or start > end:
    raise errors.ConfigError(
        f"--profile_steps={t.profile_steps}: need 1 <= START <= END (steps count from 1), "
        f"e.g. {max(start, 1)},{max(start, 1) + 5}.")
  if t.train_steps is not None and end > t.train_steps:
    raise errors.ConfigError(
        f"--profile_steps={t.profile_steps}: END {end} is past the run's last step "
        f"(--train_steps={t.train_steps}); choose steps within it.")
  return start, end


def resolve_steps(t, steps_per_epoch: int) -> int:
  """Total training steps; --train_steps and --epochs must agree when both are given."""
  if t.epochs is None:
    return t.train_steps
  from_epochs = math.ceil(t.epochs * steps_per_epoch - 1e-9)  # a started step is run whole
  if t.train_steps is not None and t.train_steps != from_epochs:
    raise errors.ConfigError(
        f"--train_steps={t.train_steps} contradicts --epochs={t.epochs:g} "
        f"({t.epochs:g} x {steps_per_epoch} steps per epoch = {from_epochs}); give only one.")
  return from_epochs
