"""The one typed, frozen training configuration, its command-line flags and their validation."""

import dataclasses
import math
import os
from typing import Optional

from absl import flags

from trainer import errors

STRATEGIES = ("auto", "one_device", "mirrored", "multi_worker_mirrored")
COLLECTIVES = ("auto", "ring", "nccl")
INPUT_MODES = ("auto", "in_memory", "stream")
LR_SCHEDULES = ("onecycle", "cosine", "constant")
LR_SCALINGS = ("linear", "none")
PADDINGS = ("same", "valid")
PRECISIONS = ("auto", "float32", "mixed")
_MAX_WAIT_S = 7 * 24 * 3600.0
# Keeps epochs x steps per epoch an integer TensorFlow's int64 step counter holds.
_MAX_EPOCHS = 1e6
# --image_size: a 1024x1024 RGB image is 12 MiB as float32, a batch of 256 of them 3 GiB before
# the first layer; --image_size=30000 ran out of memory while preparing (issue 33). Larger
# images are no job for this CNN: resize them down.
MAX_IMAGE_SIZE = 1024


@dataclasses.dataclass(frozen=True)
class Config:
  """Everything a run needs; built once from flags (or directly by tests) and never mutated."""

  model_dir: str = "runs/mnist"
  checkpoint_dir: str = ""  # "" = model_dir/checkpoints ($AIP_CHECKPOINT_DIR on Vertex AI)
  tensorboard_dir: str = ""  # "" = model_dir/logs ($AIP_TENSORBOARD_LOG_DIR on Vertex AI)
  data_dir: str = "~/tensorflow_datasets"
  dataset: str = "mnist"
  # Directory holding the four MNIST .gz files; "" means the copy vendored in this repository,
  # or in an installed package (which has none) a one-time bounded download into data_dir.
  mnist_source_dir: str = ""
  global_batch_size: int = 256
  train_steps: Optional[int] = None
  epochs: Optional[float] = None  # may be fractional: 1.5 epochs of 235 steps = 353 steps
  learning_rate: float = 0.01
  lr_schedule: str = "onecycle"
  lr_scaling: str = "linear"
  # --learning_rate is the rate for this global batch; linear scaling adjusts it for others.
  reference_batch_size: int = 256
  warmup_steps: int = 0
  weight_decay: float = 0.0
  adam_beta1: float = 0.7
  adam_beta2: float = 0.9
  # Part of the default recipe: 0.1 reached 99% in one epoch where 0 needed 1.4 (bench/README.md).
  label_smoothing: float = 0.1
  checkpoint_every_steps: int = 500
  keep_checkpoints: int = 3
  log_every_steps: int = 100
  # TensorBoard's training curve: 24 points for the default 235 steps.
  summary_every_steps: int = 10
  steps_per_loop: int = 20
  eval_every_steps: int = 0
  first_eval_step: int = 0
  seed: int = 42
  deterministic: bool = False
  strategy: str = "auto"
  num_cpu_devices: int = 0  # 0 = auto: one single-threaded replica per core (CPU-only, 1 task)
  collective_timeout_s: float = 300.0
  preemption_grace_s: float = 25.0
  # Starting over on purpose: without it a model_dir whose checkpoints cannot be read is an
  # error (exit 3), never silently overwritten.
  restart_from_scratch: bool = False
  # The trainer's own cap on platform restarts (counted in the checkpoint dir); 0 = no cap.
  max_job_restarts: int = 0
  # Refuse to train on the CPU when TensorFlow sees no GPU (also implied on NVIDIA machines,
  # unless CUDA_VISIBLE_DEVICES=-1 hides the GPUs on purpose).
  require_gpu: bool = False
  # All-reduce between workers and across GPUs: auto = NCCL with GPUs, RING on CPUs
  # (trainer/runtime/distribute.py).
  collective_implementation: str = "auto"
  bytes_per_pack: int = 0  # gradient packing for the all-reduce; 0 = TensorFlow's default
  # TensorFlow profiler trace of these steps on the chief ("" = off), e.g. "20,25".
  profile_steps: str = ""
  # The side-car evaluator gives up (exit 143) after this long without a new checkpoint.
  evaluator_timeout_s: float = 3600.0
  # The default recipe (after tuomaso/train_mnist_fast: no dropout, Adam with short memories,
  # one-cycle; with label smoothing, >= 99% test accuracy in one epoch). 2x2 pixel blocks are
  # folded into channels so both convolutions see deep 14x14 inputs: CPU kernels run those near
  # half of peak, where a 1-channel 28x28 convolution runs at a fifth (bench/README.md).
  model_widths: tuple = (32, 48)
  kernel_sizes: tuple = (3, 3)  # one per convolution block
  pool_sizes: tuple = (1, 2)  # one per convolution block; 1 = no pooling
  conv_padding: str = "same"
  space_to_depth: int = 2
  global_pool: bool = False
  dense_units: int = 128
  dropout: float = 0.0
  batch_norm: bool = False
  # auto: mixed_bfloat16 on a CPU with native bfloat16 (AVX512_BF16 or AMX, through oneDNN),
  # else float32; mixed: mixed_float16 on GPUs, mixed_bfloat16 on CPUs (trainer/step.py).
  precision: str = "auto"
  xla: bool = False
  # in_memory: the train split decoded into RAM (exact global order); stream: its record files
  # read by tf.data, file-sharded per worker; auto: stream when the decoded split would be
  # larger than in_memory_limit_mb.
  input_mode: str = "auto"
  in_memory_limit_mb: int = 2048
  shuffle_buffer: int = 10000  # stream mode: examples per input pipeline's shuffle buffer
  num_shards: int = 0  # record files per split when the dataset is prepared (0: TFDS's choice)
  # --dataset=image_folder:DIR only: resize every image to image_size x image_size (0: keep the
  # size, which must then be the same for all), and the share of images held out for testing
  # when DIR has no train/ and test/ sub-folders.
  image_size: int = 0
  eval_fraction: float = 0.1
  train_examples: int = 0  # 0 = the whole train split; tests use small subsets
  eval_examples: int = 0  # 0 = the whole test split
  export: bool = True
  # Fault injection for tests, not a flag: the loss is NaN from this step on (0: off). The
  # command line sets it through $TRAINER_INJECT_NAN_AT_STEP.
  inject_nan_at_step: int = 0

  def __post_init__(self):
    validate(self)

  def replace(self, **changes) -> "Config":
    return dataclasses.replace(self, **changes)


def _positive(name, value):
  if not value > 0:  # also false for NaN
    raise errors.ConfigError(f"--{name} must be > 0, got {value}.")


def _finite(c: Config) -> None:
  """NaN passes every comparison test and a NaN timeout never fires: no float may be non-finite."""
  for field in dataclasses.fields(c):
    value = getattr(c, field.name)
    if isinstance(value, float) and not math.isfinite(value):
      raise errors.ConfigError(f"--{field.name} must be a finite number, got {value}.")


def validate(c: Config) -> None:
  """Rejects bad or contradictory values with a message naming the flag and the fix."""
  _finite(c)
  if not c.model_dir:
    raise errors.ConfigError("--model_dir is empty: give a local path or a gs:// URI.")
  if not c.dataset:
    raise errors.ConfigError("--dataset is empty: use e.g. --dataset=mnist.")
  if c.dataset.startswith("image_folder:") and not c.dataset[len("image_folder:"):].strip():
    raise errors.ConfigError(
        f"--dataset={c.dataset} names no folder: use --dataset=image_folder:DIR (local or "
        "gs://), DIR holding one sub-folder of JPEG/PNG images per class.")
  if not 0 <= c.image_size <= MAX_IMAGE_SIZE:
    raise errors.ConfigError(
        f"--image_size must be in [0, {MAX_IMAGE_SIZE}] (0: keep the images' size; a larger "
        f"size does not fit a training batch in memory), got {c.image_size}: resize to at "
        f"most {MAX_IMAGE_SIZE}, e.g. --image_size=224.")
  if not 0.0 < c.eval_fraction < 1.0:
    raise errors.ConfigError(f"--eval_fraction must be in (0, 1), e.g. 0.1, got "
                             f"{c.eval_fraction}.")
  _positive("global_batch_size", c.global_batch_size)
  if c.train_steps is None and c.epochs is None:
    raise errors.ConfigError("Set --train_steps or --epochs.")
  if c.train_steps is not None:
    _positive("train_steps", c.train_steps)
  if c.epochs is not None:
    _positive("epochs", c.epochs)
    if c.epochs > _MAX_EPOCHS:
      raise errors.ConfigError(f"--epochs must be at most {_MAX_EPOCHS:g}, got {c.epochs:g}; "
                               "for longer runs set --train_steps.")
  _positive("learning_rate", c.learning_rate)
  _positive("reference_batch_size", c.reference_batch_size)
  _positive("checkpoint_every_steps", c.checkpoint_every_steps)
  _positive("keep_checkpoints", c.keep_checkpoints)
  _positive("log_every_steps", c.log_every_steps)
  _positive("summary_every_steps", c.summary_every_steps)
  _positive("steps_per_loop", c.steps_per_loop)
  _positive("collective_timeout_s", c.collective_timeout_s)
  _positive("preemption_grace_s", c.preemption_grace_s)
  if not c.evaluator_timeout_s > 0:  # also false for NaN
    raise errors.ConfigError(
        f"--evaluator_timeout_s must be > 0, got {c.evaluator_timeout_s}: give the seconds the "
        "evaluator waits for a new checkpoint before it exits 143 (default 3600), longer than "
        "the gap between two checkpoints.")
  for name in ("collective_timeout_s", "preemption_grace_s", "evaluator_timeout_s"):
    # Python's timers overflow far below float's range; a week is longer than any real wait.
    if getattr(c, name) > _MAX_WAIT_S:
      raise errors.ConfigError(f"--{name} must be at most {_MAX_WAIT_S:.0f} (a week), got "
                               f"{getattr(c, name)}.")
  for name in ("num_cpu_devices", "warmup_steps", "eval_every_steps", "first_eval_step",
               "train_examples",
               "eval_examples", "inject_nan_at_step", "max_job_restarts", "num_shards"):
    if getattr(c, name) < 0:
      raise errors.ConfigError(f"--{name} must be >= 0, got {getattr(c, name)}.")
  if not 0.0 <= c.dropout < 1.0:
    raise errors.ConfigError(f"--dropout must be in [0, 1), got {c.dropout}.")
  if not 0.0 <= c.label_smoothing < 1.0:
    raise errors.ConfigError(f"--label_smoothing must be in [0, 1), got {c.label_smoothing}.")
  if c.weight_decay < 0:
    raise errors.ConfigError(f"--weight_decay must be >= 0, got {c.weight_decay}.")
  if c.strategy not in STRATEGIES:
    raise errors.ConfigError(f"--strategy={c.strategy!r}: use one of {', '.join(STRATEGIES)}.")
  if c.lr_schedule not in LR_SCHEDULES:
    raise errors.ConfigError(
        f"--lr_schedule={c.lr_schedule!r}: use one of {', '.join(LR_SCHEDULES)}.")
  if c.lr_scaling not in LR_SCALINGS:
    raise errors.ConfigError(f"--lr_scaling={c.lr_scaling!r}: use one of {', '.join(LR_SCALINGS)}.")
  if not c.model_widths or any(w <= 0 for w in c.model_widths):
    raise errors.ConfigError(f"--model_widths must be positive integers, got {c.model_widths}.")
  if len(c.kernel_sizes) != len(c.model_widths) or any(k <= 0 for k in c.kernel_sizes):
    raise errors.ConfigError(
        f"--kernel_sizes={','.join(map(str, c.kernel_sizes))} must give one positive size per "
        f"--model_widths entry ({len(c.model_widths)}).")
  if len(c.pool_sizes) != len(c.model_widths) or any(p <= 0 for p in c.pool_sizes):
    raise errors.ConfigError(
        f"--pool_sizes={','.join(map(str, c.pool_sizes))} must give one positive size per "
        f"--model_widths entry ({len(c.model_widths)}); 1 means no pooling.")
  _positive("space_to_depth", c.space_to_depth)
  _positive("in_memory_limit_mb", c.in_memory_limit_mb)
  _positive("shuffle_buffer", c.shuffle_buffer)
  if c.input_mode not in INPUT_MODES:
    raise errors.ConfigError(
        f"--input_mode={c.input_mode!r}: use one of {', '.join(INPUT_MODES)}.")
  if c.input_mode == "stream" and c.train_examples:
    raise errors.ConfigError(
        "--train_examples takes a subset of a split held in memory: use it with "
        "--input_mode=in_memory, or drop it to stream the whole split.")
  if c.precision not in PRECISIONS:
    raise errors.ConfigError(
        f"--precision={c.precision!r}: use one of {', '.join(PRECISIONS)}.")
  if c.conv_padding not in PADDINGS:
    raise errors.ConfigError(
        f"--conv_padding={c.conv_padding!r}: use one of {', '.join(PADDINGS)}.")
  for name in ("adam_beta1", "adam_beta2"):
    if not 0.0 <= getattr(c, name) < 1.0:
      raise errors.ConfigError(f"--{name} must be in [0, 1), got {getattr(c, name)}.")
  if c.num_cpu_devices > 1 and c.strategy in ("one_device", "multi_worker_mirrored"):
    raise errors.ConfigError(
        f"--num_cpu_devices={c.num_cpu_devices} contradicts --strategy={c.strategy}: "
        "logical CPU devices are for --strategy=mirrored (or auto).")
  if c.collective_implementation not in COLLECTIVES:
    raise errors.ConfigError(f"--collective_implementation={c.collective_implementation!r}: use "
                             f"one of {', '.join(COLLECTIVES)}.")
  if c.bytes_per_pack < 0:
    raise errors.ConfigError(f"--bytes_per_pack must be >= 0 (0: TensorFlow's choice), got "
                             f"{c.bytes_per_pack}.")
  profile_range(c)


def profile_range(c: Config) -> Optional[tuple]:
  """--profile_steps as (START, END), steps counted from 1, both profiled; None when empty."""
  if not c.profile_steps:
    return None
  try:
    start, end = (int(part) for part in c.profile_steps.split(","))
  except ValueError:
    raise errors.ConfigError(
        f"--profile_steps={c.profile_steps!r} must be two integers START,END (e.g. 20,25: "
        "steps 20 to 25), or empty for no profile.") from None
  if start < 1 or start > end:
    raise errors.ConfigError(
        f"--profile_steps={c.profile_steps}: need 1 <= START <= END (steps count from 1), "
        f"e.g. {max(start, 1)},{max(start, 1) + 5}.")
  if c.train_steps is not None and end > c.train_steps:
    raise errors.ConfigError(
        f"--profile_steps={c.profile_steps}: END {end} is past the run's last step "
        f"(--train_steps={c.train_steps}); choose steps within it.")
  return start, end


def resolve_steps(c: Config, steps_per_epoch: int) -> int:
  """Total training steps; --train_steps and --epochs must agree when both are given."""
  if c.epochs is None:
    return c.train_steps
  from_epochs = math.ceil(c.epochs * steps_per_epoch - 1e-9)  # a started step is run whole
  if c.train_steps is not None and c.train_steps != from_epochs:
    raise errors.ConfigError(
        f"--train_steps={c.train_steps} contradicts --epochs={c.epochs:g} "
        f"({c.epochs:g} x {steps_per_epoch} steps per epoch = {from_epochs}); give only one.")
  return from_epochs


# ---- Command-line flags: one flag per Config field, same name. ----

_DEFAULTS = Config(epochs=1.0)
_HELP = {
    "model_dir": "Where checkpoints, summaries, metrics.json and export/ go (local or gs://). "
                 "Defaults to $AIP_MODEL_DIR when set.",
    "checkpoint_dir": "Checkpoint directory (local or gs://); default model_dir/checkpoints or "
                      "$AIP_CHECKPOINT_DIR.",
    "tensorboard_dir": "TensorBoard log directory; default model_dir/logs or "
                       "$AIP_TENSORBOARD_LOG_DIR.",
    "data_dir": "TFDS data directory (local or gs://); MNIST is prepared here on first use from "
                "--mnist_source_dir, the vendored files or (installed package) a bounded "
                "download; exit 3 without network.",
    "dataset": "TFDS image-classification dataset name, e.g. mnist or fashion_mnist, or "
               "image_folder:DIR for your own JPEG/PNG images (DIR local or gs://, one "
               "sub-folder per class; prepared once into --data_dir).",
    "mnist_source_dir": "Directory (local or gs://) with the four MNIST .gz files (default: the "
                        "vendored copy; an installed package downloads them once, exit 3 "
                        "without network).",
    "global_batch_size": "Batch size summed over all replicas; must divide by the replica count.",
    "train_steps": "Total optimizer steps (alternative to --epochs; both must agree).",
    "epochs": "Passes over the training split, may be fractional (default 1 when "
              "--train_steps is not set).",
    "learning_rate": "Peak learning rate at --reference_batch_size.",
    "lr_schedule": "onecycle (warmup then cosine/linear down), cosine (with warmup) or constant.",
    "lr_scaling": "linear: scale the learning rate by global_batch_size/reference_batch_size.",
    "reference_batch_size": "The global batch --learning_rate was tuned for.",
    "warmup_steps": "Linear warmup steps (onecycle uses 25%% of training when 0).",
    "weight_decay": "Decoupled weight decay (AdamW) coefficient.",
    "adam_beta1": "Adam's first-moment decay.",
    "adam_beta2": "Adam's second-moment decay.",
    "label_smoothing": "Label smoothing of the training loss (0 turns it off; evaluation "
                       "reports plain cross-entropy).",
    "checkpoint_every_steps": "Checkpoint period in steps (plus one at the end).",
    "keep_checkpoints": "How many recent checkpoints to keep.",
    "log_every_steps": "Period of the training log's progress lines, in steps.",
    "summary_every_steps": "Period of TensorBoard's training scalars (loss, accuracy, learning "
                           "rate, images/s), in steps.",
    "steps_per_loop": "Steps run inside one tf.function call (fewer host round trips).",
    "eval_every_steps": "Evaluate on the test split every N steps (0: only at the end).",
    "first_eval_step": "Evaluate first at this step, then every --eval_every_steps (0: first "
                       "at --eval_every_steps). Late and dense evaluations find the step a "
                       "target accuracy is reached without slowing the early steps.",
    "seed": "Seed for initialization and data order.",
    "deterministic": "Op determinism and fixed seeds: resumed runs match uninterrupted ones.",
    "strategy": "Distribution strategy; auto picks from TF_CONFIG and the visible GPUs.",
    "num_cpu_devices": "Split the CPU into N logical devices (MirroredStrategy without GPUs); "
                       "0 = one per core for a single CPU-only task, 1 = one device.",
    "collective_timeout_s": "Give up (exit 143) when a peer is silent this long.",
    "preemption_grace_s": "Seconds between SIGTERM and the forced exit.",
    "restart_from_scratch": "Move aside a model_dir's unreadable checkpoints and start at step 0 "
                            "(without it such a model_dir is an error, exit 3).",
    "max_job_restarts": "Exit with the permanent code 7 once the job has been started more than "
                        "this many times in one checkpoint dir (0: no cap).",
    "collective_implementation": "How gradients are all-reduced between workers and across one "
                                 "machine's GPUs: auto (NCCL with GPUs, RING on CPUs), ring or "
                                 "nccl.",
    "bytes_per_pack": "Pack gradients into all-reduces of this many bytes, between workers only "
                      "(0: TensorFlow's choice).",
    "profile_steps": "Record a TensorFlow profiler trace of steps START,END on the chief into "
                     "the TensorBoard log dir (empty: off).",
    "evaluator_timeout_s": "Side-car evaluator: exit 143 when no new checkpoint appears for this "
                           "long while training has not finished.",
    "require_gpu": "Exit 2 when TensorFlow sees no GPU instead of training on the CPU (implied "
                   "when the machine has NVIDIA GPUs, unless CUDA_VISIBLE_DEVICES is -1 or "
                   "empty).",
    "model_widths": "Channels of the convolution blocks.",
    "kernel_sizes": "Kernel size of each convolution block (one per --model_widths entry).",
    "pool_sizes": "Max-pool size after each convolution block (1: no pooling).",
    "space_to_depth": "Fold each NxN pixel block into channels before the first convolution "
                      "(1: off): the convolutions then run on fewer, deeper pixels.",
    "global_pool": "Average each channel over the image before the dense layers, instead of "
                   "flattening.",
    "conv_padding": "Convolution padding: same keeps the size, valid shrinks it (less compute).",
    "dense_units": "Width of the hidden dense layer (0: none).",
    "dropout": "Dropout rate before the classifier.",
    "batch_norm": "Batch normalization after each convolution.",
    "precision": "auto: mixed_bfloat16 on a CPU with native bfloat16 (AVX512_BF16 or AMX), "
                 "float32 elsewhere (GPUs included); mixed: mixed_float16 on GPUs (with loss "
                 "scaling), mixed_bfloat16 on CPUs; float32. Variables, evaluation and export "
                 "stay float32.",
    "xla": "Compile the training step with XLA (jit_compile).",
    "input_mode": "auto (stream when the decoded train split exceeds --in_memory_limit_mb), "
                  "in_memory (decode into RAM, exact global order) or stream (read the record "
                  "files with tf.data, sharded by file per worker).",
    "in_memory_limit_mb": "auto's threshold: the decoded train split's size in MB.",
    "shuffle_buffer": "Stream mode: examples in each input pipeline's shuffle buffer.",
    "num_shards": "Record files per split when --data_dir is prepared here (0: TFDS's choice); "
                  "stream mode wants at least one per worker.",
    "image_size": "--dataset=image_folder:DIR: resize every image to NxN pixels (0: keep the "
                  "size, which must then be the same for every image).",
    "eval_fraction": "--dataset=image_folder:DIR: share of the images held out as the test "
                     "split, chosen by a hash of each file's path (the same every run); unused "
                     "when DIR has train/ and test/ sub-folders.",
    "train_examples": "Use only the first N training examples (0: all).",
    "eval_examples": "Evaluate on only the first N test examples (0: all).",
    "export": "Export a SavedModel to model_dir/export after training.",
}


_PER_BLOCK = ("model_widths", "kernel_sizes", "pool_sizes")
# Config fields that tests set but users never do: environment variables, not flags, so that
# --helpfull lists only what users set.
TEST_HOOKS = {"inject_nan_at_step": "TRAINER_INJECT_NAN_AT_STEP"}
_CHOICES = {"strategy": STRATEGIES, "input_mode": INPUT_MODES,
            "collective_implementation": COLLECTIVES, "lr_schedule": LR_SCHEDULES,
            "lr_scaling": LR_SCALINGS, "conv_padding": PADDINGS, "precision": PRECISIONS}


def define_flags(flag_values=flags.FLAGS) -> None:
  """Defines one absl flag per Config field (idempotent, so tests may call it again), and the
  old spelling --[no]mixed_precision."""
  if "global_batch_size" in flag_values:
    return
  fv = {"flag_values": flag_values}
  flags.DEFINE_boolean("mixed_precision", False, "The old spelling of --precision=mixed "
                       "(--nomixed_precision: --precision=float32).", **fv)
  for field in dataclasses.fields(Config):
    if field.name in TEST_HOOKS:
      continue
    default = getattr(_DEFAULTS, field.name)
    help_text = _HELP[field.name]
    if field.name == "train_steps":
      flags.DEFINE_integer(field.name, None, help_text, **fv)
    elif field.name == "epochs":
      flags.DEFINE_float(field.name, None, help_text, **fv)
    elif field.name in _PER_BLOCK:
      flags.DEFINE_list(field.name, [str(w) for w in default], help_text, **fv)
    elif field.name in _CHOICES:
      choices = _CHOICES[field.name]
      flags.DEFINE_enum(field.name, default, choices, help_text, **fv)
    elif isinstance(default, bool):
      flags.DEFINE_boolean(field.name, default, help_text, **fv)
    elif isinstance(default, int):
      flags.DEFINE_integer(field.name, default, help_text, **fv)
    elif isinstance(default, float):
      flags.DEFINE_float(field.name, default, help_text, **fv)
    else:
      flags.DEFINE_string(field.name, default, help_text, **fv)


def config_from_flags(flag_values=flags.FLAGS, environ=os.environ) -> Config:
  """Builds the Config from parsed flags; platform environment variables fill unset paths."""
  values = {f.name: flag_values[f.name].value for f in dataclasses.fields(Config)
            if f.name not in TEST_HOOKS}
  for name, variable in TEST_HOOKS.items():
    try:
      values[name] = int(environ.get(variable) or 0)
    except ValueError:
      raise errors.ConfigError(f"${variable} must be an integer, got {environ[variable]!r}.") from None
  for name in _PER_BLOCK:
    try:
      values[name] = tuple(int(w) for w in values[name])
    except ValueError:
      raise errors.ConfigError(
          f"--{name} must be comma-separated integers, got {','.join(values[name])}.")
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
    values["epochs"] = _DEFAULTS.epochs
  if flag_values["mixed_precision"].present:
    old = "mixed" if flag_values["mixed_precision"].value else "float32"
    if flag_values["precision"].present and values["precision"] != old:
      raise errors.ConfigError(
          f"--{'' if old == 'mixed' else 'no'}mixed_precision contradicts "
          f"--precision={values['precision']}: give only --precision.")
    values["precision"] = old
  return Config(**values)
