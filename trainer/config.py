"""The one typed, frozen training configuration: six groups, as tensorflow/models' config
definitions group an experiment, each field's flag help in its metadata, the flags generated from
it (trainer/options.py, the generator deploy/ uses too) and validation as a table of rules.

Flags keep flat names (--data_dir, --learning_rate); Config(**flat) and replace(**flat) take the
same names, so tests and notebooks need not know the groups. Each component is handed its group.
"""

import dataclasses
import os
from typing import Optional

from absl import flags

from trainer import errors
from trainer.options import option
# The rules, and the choices the flags offer (re-exported: callers read them here).
from trainer.validation import (COLLECTIVES, INPUT_MODES, LR_SCALINGS,  # noqa: F401
                                LR_SCHEDULES, MAX_IMAGE_SIZE, PADDINGS, PRECISIONS, RULES,
                                STRATEGIES, profile_range, resolve_steps, validate)


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """What to train on and how it is read."""

  data_dir: str = option(
      "~/tensorflow_datasets", "TFDS data directory (local or gs://); MNIST is prepared here on "
      "first use from --mnist_source_dir, the vendored files or (installed package) a bounded "
      "download; exit 3 without network.")
  dataset: str = option(
      "mnist", "TFDS image-classification dataset name, e.g. mnist or fashion_mnist, or "
      "image_folder:DIR for your own JPEG/PNG images (DIR local or gs://, one sub-folder per "
      "class; prepared once into --data_dir).")
  mnist_source_dir: str = option(
      "", "Directory (local or gs://) with the four MNIST .gz files (default: the vendored copy; "
      "an installed package downloads them once, exit 3 without network).")
  input_mode: str = option(
      "auto", "auto (stream when the decoded train split exceeds --in_memory_limit_mb), "
      "in_memory (decode into RAM, exact global order) or stream (read the record files with "
      "tf.data, sharded by file per worker).", choices=INPUT_MODES)
  in_memory_limit_mb: int = option(2048, "auto's threshold: the decoded train split's size in MB.")
  shuffle_buffer: int = option(
      10000, "Stream mode: examples in each input pipeline's shuffle buffer.")
  num_shards: int = option(
      0, "Record files per split when --data_dir is prepared here (0: TFDS's choice); stream "
      "mode wants at least one per worker.")
  image_size: int = option(
      0, "--dataset=image_folder:DIR: resize every image to NxN pixels (0: keep the size, which "
      "must then be the same for every image).")
  eval_fraction: float = option(
      0.1, "--dataset=image_folder:DIR: share of the images held out as the test split, chosen "
      "by a hash of each file's path (the same every run); unused when DIR has train/ and test/ "
      "sub-folders.")
  train_examples: int = option(0, "Use only the first N training examples (0: all).")
  eval_examples: int = option(0, "Evaluate on only the first N test examples (0: all).")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """The CNN. The default (after tuomaso/train_mnist_fast: no dropout; 2x2 pixel blocks folded
  into channels so both convolutions see deep 14x14 inputs) reaches >= 99% in one epoch."""

  model_widths: tuple = option((32, 48), "Channels of the convolution blocks.")
  kernel_sizes: tuple = option(
      (3, 3), "Kernel size of each convolution block (one per --model_widths entry).")
  pool_sizes: tuple = option(
      (1, 2), "Max-pool size after each convolution block (1: no pooling).")
  conv_padding: str = option(
      "same", "Convolution padding: same keeps the size, valid shrinks it (less compute).",
      choices=PADDINGS)
  space_to_depth: int = option(
      2, "Fold each NxN pixel block into channels before the first convolution (1: off): the "
      "convolutions then run on fewer, deeper pixels.")
  global_pool: bool = option(
      False, "Average each channel over the image before the dense layers, instead of "
      "flattening.")
  dense_units: int = option(128, "Width of the hidden dense layer (0: none).")
  dropout: float = option(0.0, "Dropout rate before the classifier.")
  batch_norm: bool = option(False, "Batch normalization after each convolution.")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """Adam (with short memories, which the one-cycle schedule tolerates) and its schedule."""

  learning_rate: float = option(0.01, "Peak learning rate at --reference_batch_size.")
  lr_schedule: str = option(
      "onecycle", "onecycle (warmup then cosine/linear down), cosine (with warmup) or constant.",
      choices=LR_SCHEDULES)
  lr_scaling: str = option(
      "linear", "linear: scale the learning rate by global_batch_size/reference_batch_size.",
      choices=LR_SCALINGS)
  reference_batch_size: int = option(256, "The global batch --learning_rate was tuned for.")
  warmup_steps: int = option(
      0, "Linear warmup steps (onecycle uses 25%% of training when 0).")
  weight_decay: float = option(0.0, "Decoupled weight decay (AdamW) coefficient.")
  adam_beta1: float = option(0.7, "Adam's first-moment decay.")
  adam_beta2: float = option(0.9, "Adam's second-moment decay.")
  label_smoothing: float = option(
      0.1, "Label smoothing of the training loss (0 turns it off; evaluation reports plain "
      "cross-entropy).")


@dataclasses.dataclass(frozen=True)
class TrainingConfig:
  """The loop: how long, in which numbers, and what happens at chunk ends."""

  global_batch_size: int = option(
      256, "Batch size summed over all replicas; must divide by the replica count.")
  train_steps: Optional[int] = option(
      None, "Total optimizer steps (alternative to --epochs; both must agree).", flag_type=int)
  epochs: Optional[float] = option(
      None, "Passes over the training split, may be fractional (default 1 when --train_steps "
      "is not set).", flag_type=float)
  seed: int = option(42, "Seed for initialization and data order.")
  deterministic: bool = option(
      False, "Op determinism and fixed seeds: resumed runs match uninterrupted ones.")
  precision: str = option(
      "auto", "auto: mixed_bfloat16 on a CPU with native bfloat16 (AVX512_BF16 or AMX), "
      "float32 elsewhere (GPUs included); mixed: mixed_float16 on GPUs (with loss scaling), "
      "mixed_bfloat16 on CPUs; float32. Variables, evaluation and export stay float32.",
      choices=PRECISIONS)
  xla: bool = option(False, "Compile the training step with XLA (jit_compile).")
  steps_per_loop: int = option(
      20, "Steps run inside one tf.function call (fewer host round trips).")
  log_every_steps: int = option(100, "Period of the training log's progress lines, in steps.")
  summary_every_steps: int = option(
      10, "Period of TensorBoard's training scalars (loss, accuracy, learning rate, images/s), "
      "in steps.")
  checkpoint_every_steps: int = option(
      500, "Checkpoint period in steps (plus one at the end).")
  keep_checkpoints: int = option(3, "How many recent checkpoints to keep.")
  eval_every_steps: int = option(
      0, "Evaluate on the test split every N steps (0: only at the end).")
  first_eval_step: int = option(
      0, "Evaluate first at this step, then every --eval_every_steps (0: first at "
      "--eval_every_steps). Late and dense evaluations find the step a target accuracy is "
      "reached without slowing the early steps.")
  profile_steps: str = option(
      "", "Record a TensorFlow profiler trace of steps START,END on the chief into the "
      "TensorBoard log dir (empty: off).")
  # A test hook, not a flag: the loss is NaN from this step on (0: off); the command line sets
  # it through $TRAINER_INJECT_NAN_AT_STEP.
  inject_nan_at_step: int = option(0)


@dataclasses.dataclass(frozen=True)
class RuntimeConfig:
  """The process in its cluster: strategy, devices, collectives and every bounded wait."""

  strategy: str = option(
      "auto", "Distribution strategy; auto picks from TF_CONFIG and the visible GPUs.",
      choices=STRATEGIES)
  num_cpu_devices: int = option(
      0, "Split the CPU into N logical devices (MirroredStrategy without GPUs); 0 = one per "
      "core for a single CPU-only task, 1 = one device.")
  collective_implementation: str = option(
      "auto", "How gradients are all-reduced between workers and across one machine's GPUs: "
      "auto (NCCL with GPUs, RING on CPUs), ring or nccl.", choices=COLLECTIVES)
  bytes_per_pack: int = option(
      0, "Pack gradients into all-reduces of this many bytes, between workers only (0: "
      "TensorFlow's choice).")
  collective_timeout_s: float = option(
      300.0, "Give up (exit 143) when a peer is silent this long.")
  preemption_grace_s: float = option(25.0, "Seconds between SIGTERM and the forced exit.")
  evaluator_timeout_s: float = option(
      3600.0, "Side-car evaluator: exit 143 when no new checkpoint appears for this long while "
      "training has not finished.")
  max_job_restarts: int = option(
      0, "Exit with the permanent code 7 once the job has been started more than this many "
      "times in one checkpoint dir (0: no cap).")
  require_gpu: bool = option(
      False, "Exit 2 when TensorFlow sees no GPU instead of training on the CPU (implied when "
      "the machine has NVIDIA GPUs, unless CUDA_VISIBLE_DEVICES is -1 or empty).")


@dataclasses.dataclass(frozen=True)
class OutputsConfig:
  """Where a run's outputs go, and whether it may start over."""

  model_dir: str = option(
      "runs/mnist", "Where checkpoints, summaries, metrics.json and export/ go (local or "
      "gs://). Defaults to $AIP_MODEL_DIR when set.")
  checkpoint_dir: str = option(
      "", "Checkpoint directory (local or gs://); default model_dir/checkpoints or "
      "$AIP_CHECKPOINT_DIR.")
  tensorboard_dir: str = option(
      "", "TensorBoard log directory; default model_dir/logs or $AIP_TENSORBOARD_LOG_DIR.")
  restart_from_scratch: bool = option(
      False, "Move aside a model_dir's unreadable checkpoints and start at step 0 (without it "
      "such a model_dir is an error, exit 3).")
  export: bool = option(True, "Export a SavedModel to model_dir/export after training.")


GROUPS = {"data": DataConfig, "model": ModelConfig, "optimizer": OptimizerConfig,
          "training": TrainingConfig, "runtime": RuntimeConfig, "outputs": OutputsConfig}
# A flat (flag) name -> its group's name.
GROUP_OF = {f.name: group for group, cls in GROUPS.items() for f in dataclasses.fields(cls)}


@dataclasses.dataclass(frozen=True, init=False)
class Config:
  """Everything a run needs; built once (from flags, or by tests from flat names) and never
  mutated. Config(learning_rate=0.1, data=DataConfig(...)) mixes both ways."""

  data: DataConfig
  model: ModelConfig
  optimizer: OptimizerConfig
  training: TrainingConfig
  runtime: RuntimeConfig
  outputs: OutputsConfig

  def __init__(self, **values):
    groups, flat = {}, {}
    for name, value in values.items():
      if name in GROUPS:
        groups[name] = value
      elif name in GROUP_OF:
        flat.setdefault(GROUP_OF[name], {})[name] = value
      else:
        raise TypeError(f"Config has no field {name!r}")
    for name, cls in GROUPS.items():
      group = groups.get(name) or cls()
      object.__setattr__(self, name, dataclasses.replace(group, **flat.get(name, {})))
    validate(self)

  def replace(self, **changes) -> "Config":
    """A copy with some fields changed (flat names, or whole groups)."""
    return Config(**{name: getattr(self, name) for name in GROUPS}, **changes)

  def flat(self) -> dict:
    """Every field by its flag's name."""
    return {f.name: getattr(getattr(self, group), f.name)
            for group, cls in GROUPS.items() for f in dataclasses.fields(cls)}


def default(name: str):
  """The default of a field, by its flag's name (the flags' single source)."""
  for field in dataclasses.fields(GROUPS[GROUP_OF[name]]):
    if field.name == name:
      return field.default
  raise KeyError(name)


# ---- Command-line flags: one flag per field with help, the same name. ----

_PER_BLOCK = ("model_widths", "kernel_sizes", "pool_sizes")
# Config fields that tests set but users never do: environment variables, not flags, so that
# --helpfull lists only what users set.
TEST_HOOKS = {"inject_nan_at_step": "TRAINER_INJECT_NAN_AT_STEP"}
DEFAULT_EPOCHS = 1.0


def define_flags(flag_values=flags.FLAGS) -> None:
  """Defines one absl flag per Config field (idempotent, so tests may call it again), and the
  old spelling --[no]mixed_precision."""
  if "global_batch_size" in flag_values:
    return
  flags.DEFINE_boolean("mixed_precision", False, "The old spelling of --precision=mixed "
                       "(--nomixed_precision: --precision=float32).", flag_values=flag_values)
  from trainer import options  # pylint: disable=import-outside-toplevel
  for cls in GROUPS.values():
    options.define_flags(cls, flag_values)


def config_from_flags(flag_values=flags.FLAGS, environ=os.environ) -> Config:
  """Builds the Config from parsed flags; platform environment variables fill unset paths."""
  from trainer import options  # pylint: disable=import-outside-toplevel
  values = {}
  for cls in GROUPS.values():
    values.update(options.values_from_flags(cls, flag_values, error=errors.ConfigError))
  for name, variable in TEST_HOOKS.items():
    try:
      values[name] = int(environ.get(variable) or 0)
    except ValueError:
      raise errors.ConfigError(f"${variable} must be an integer, got {environ[variable]!r}.") from None
  for name in _PER_BLOCK[1:]:
    if not flag_values[name].present:
      # --model_widths alone sets the depth: extra blocks reuse the last default size.
      defaults = values[name]
      values[name] = tuple(defaults[min(i, len(defaults) - 1)]
                           for i in range(len(values["model_widths"])))
  # Vertex AI tells the job where outputs go; an explicit flag still wins.
  for field, variable in (("model_dir", "AIP_MODEL_DIR"), ("checkpoint_dir", "AIP_CHECKPOINT_DIR"),
                          ("tensorboard_dir", "AIP_TENSORBOARD_LOG_DIR")):
    if not flag_values[field].present and environ.get(variable):
      values[field] = environ[variable]
  if values["train_steps"] is None and values["epochs"] is None:
    values["epochs"] = DEFAULT_EPOCHS
  if flag_values["mixed_precision"].present:
    old = "mixed" if flag_values["mixed_precision"].value else "float32"
    if flag_values["precision"].present and values["precision"] != old:
      raise errors.ConfigError(
          f"--{'' if old == 'mixed' else 'no'}mixed_precision contradicts "
          f"--precision={values['precision']}: give only --precision.")
    values["precision"] = old
  return Config(**values)
