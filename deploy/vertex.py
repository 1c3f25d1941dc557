"""Vertex AI custom-job and hyperparameter-tuning specs for the trainer: render them, or submit one.

Usage (TRAINER_ARGS after `--` go to trainer.task; --strategy and --max_job_restarts are set here):
  python -m deploy.vertex render --out=DIR --output_dir=gs://B/runs/R
      [--image_uri=IMAGE] [--staging_bucket=gs://S --executor_image_uri=IMAGE] [-- TRAINER_ARGS]
  python -m deploy.vertex submit --job={one_gpu,multi_gpu,multi_worker,hp_tuning}
      --output_dir=gs://B/runs/R (--image_uri=IMAGE | --staging_bucket=gs://S
      --executor_image_uri=IMAGE) [--dry_run | --project=P] [--region=R] [-- TRAINER_ARGS]
  (--evaluator adds worker pool 3, a side-car evaluator, to the multi_worker job.)

`submit --dry_run` prints the REST request body, and on stderr the curl and gcloud commands that
send it; `render` writes every spec as one JSON file each.
"""

import ast
import dataclasses
import json
import os
import pathlib
import re
import shlex
import sys
from typing import Optional, Sequence

from absl import app
from absl import flags
from absl import logging

from trainer import options as option_flags
from deploy import trainer_args
from deploy.defaults import DEFAULT_MAX_JOB_RESTARTS  # vertex.DEFAULT_MAX_JOB_RESTARTS too
from trainer.options import option

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
# setup.py's project name as setuptools spells it in sdist file names.
SDIST_PREFIX = "mnist_dist_trainer"
PYTHON_MODULE = "trainer.task"
# Vertex AI's newest prebuilt TensorFlow GPU training image, per
# https://cloud.google.com/vertex-ai/docs/training/pre-built-containers: there is no 2.21 build,
# so package mode is opt-in. Installing the sdist there replaces TensorFlow with setup.py's pin
# at every replica start; the custom container (--image_uri) runs the pinned version.
NEWEST_PREBUILT_TF = "tf-gpu.2-17.py310"
PREBUILT_IMAGE_RE = re.compile(r"/vertex-ai/training/tf-(?:cpu|gpu)\.(\d+)-(\d+)")
JOB_KINDS = ("one_gpu", "multi_gpu", "multi_worker", "hp_tuning")
MODES = ("package", "container")
STRATEGY_OF = {"one_gpu": "one_device", "multi_gpu": "mirrored",
               "multi_worker": "multi_worker_mirrored", "hp_tuning": "one_device"}
HP_METRIC = "test_accuracy"
TUNED_FLAGS = ("learning_rate", "global_batch_size")
# Artifact Registry's multi-regions (https://cloud.google.com/artifact-registry/docs/repositories/
# repo-locations); Vertex AI publishes its prebuilt images in us-, europe- and asia-docker.pkg.dev.
MULTI_REGIONS = ("us", "europe", "asia")
_REGION_RE = re.compile(r"^[a-z]+-[a-z]+[0-9]+$")
_TENSORBOARD_RE = re.compile(r"^projects/[^/]+/locations/([a-z0-9-]+)/tensorboards/[^/]+$")

# ---- Which GPUs Vertex AI attaches to which machine types ----
# Vertex AI "Configure compute resources for custom training"
# (https://cloud.google.com/vertex-ai/docs/training/configure-compute) lists the machine types a
# worker pool takes; Compute Engine "GPU machine types" (https://cloud.google.com/compute/docs/gpus)
# and "Accelerator-optimized machine family"
# (https://cloud.google.com/compute/docs/accelerator-optimized-machines) say which GPUs each
# carries. N1 machines take 1, 2, 4 (or 8 for V100) GPUs of the listed types; the A2, A3, A4, A4X
# and G2 machine types come with a fixed type and count, the count in the name (G2: by size).
N1_GPU_COUNTS = {"NVIDIA_TESLA_T4": (1, 2, 4), "NVIDIA_TESLA_V100": (1, 2, 4, 8),
                 "NVIDIA_TESLA_P100": (1, 2, 4), "NVIDIA_TESLA_P4": (1, 2, 4)}
# Compute Engine's N1 + GPU tables (https://cloud.google.com/compute/docs/gpus, "N1 general-purpose
# machine types"): the most vCPUs an N1 VM may have with that many GPUs; a bigger machine is
# refused when the VM is created. The same tables cap memory (1 V100: 78 GB, ...); no predefined
# n1-standard/highmem/highcpu type within a vCPU cap exceeds its memory cap, so only vCPUs are
# checked. 4 P100s allow 96 vCPUs except in us-east1-c, europe-west1-b and europe-west1-d (64):
# Vertex AI picks the zone, so a 64+ vCPU machine with 4 P100s may still be refused there.
# deploy/README.md says where these numbers were read.
N1_MAX_VCPUS = {"NVIDIA_TESLA_T4": {1: 48, 2: 48, 4: 96},
                "NVIDIA_TESLA_V100": {1: 12, 2: 24, 4: 48, 8: 96},
                "NVIDIA_TESLA_P100": {1: 16, 2: 32, 4: 96},
                "NVIDIA_TESLA_P4": {1: 24, 2: 48, 4: 96}}
N1_DEFAULT_GPU = "NVIDIA_TESLA_T4"
# Predefined N1 sizes (https://cloud.google.com/compute/docs/general-purpose-machines#n1_machines).
N1_SIZES = (1, 2, 4, 8, 16, 32, 64, 96)
# AcceleratorType names Vertex AI keeps in its enum for GPUs that are gone: never valid.
RETIRED_GPUS = {"NVIDIA_TESLA_K80": "reached end of support "
                                    "(https://cloud.google.com/compute/docs/eol/k80-eol)"}
_N1_RE = re.compile(r"^n1-(standard|highmem|highcpu)-(\d+)$")
FIXED_GPU_MACHINES = {
    **{f"a2-highgpu-{n}g": ("NVIDIA_TESLA_A100", n) for n in (1, 2, 4, 8)},
    "a2-megagpu-16g": ("NVIDIA_TESLA_A100", 16),
    **{f"a2-ultragpu-{n}g": ("NVIDIA_A100_80GB", n) for n in (1, 2, 4, 8)},
    **{f"g2-standard-{v}": ("NVIDIA_L4", 1) for v in (4, 8, 12, 16, 32)},
    "g2-standard-24": ("NVIDIA_L4", 2),
    "g2-standard-48": ("NVIDIA_L4", 4),
    "g2-standard-96": ("NVIDIA_L4", 8),
    **{f"a3-highgpu-{n}g": ("NVIDIA_H100_80GB", n) for n in (1, 2, 4, 8)},
    "a3-megagpu-8g": ("NVIDIA_H100_MEGA_80GB", 8),
    "a3-ultragpu-8g": ("NVIDIA_H200_141GB", 8),
    "a4-highgpu-8g": ("NVIDIA_B200", 8),
    "a4x-highgpu-4g": ("NVIDIA_GB200", 4),
}
# Machine types that exist but that this package cannot run on, with the reason and the way out.
# A4X hosts have Arm (NVIDIA Grace) CPUs and need an image built for Arm
# (https://cloud.google.com/vertex-ai/docs/training/training-clusters/compute-resources, "A4X
# machine type"); no Arm build of the image from deploy/Dockerfile has been made or tested.
UNSUPPORTED_MACHINES = {
    "a4x-highgpu-4g": "has Arm (NVIDIA Grace) CPUs, and Vertex AI runs only images built for Arm "
                      "there; no Arm build of the image from deploy/Dockerfile has been made or "
                      "tested. Use a4-highgpu-8g (8 x NVIDIA_B200) instead.",
}
# Predefined machine types end in their vCPU count; custom ones read TYPE-custom-VCPUS-MEMORY.
_VCPUS_RE = re.compile(r"^[a-z0-9]+-(?:custom-(\d+)-\d+|[a-z]+-(\d+))$")


class SpecError(ValueError):
  """Options that cannot make a valid job; the message names the flag and the fix."""


@dataclasses.dataclass(frozen=True)
class Options:
  """Everything a job spec depends on; built from flags (or directly by tests).

  Each field is also a command-line flag with the help text given here (trainer/options.py).
  """

  output_dir: str = option(help="gs:// prefix; each job writes under OUTPUT_DIR/<job>.")
  region: str = option("us-central1", "Vertex AI region the job runs in.")
  staging_bucket: str = option("", "gs:// bucket the sdist is uploaded to (package mode).")
  package_uri: str = option("", "gs:// URI of an already uploaded sdist (no upload).")
  image_uri: str = option("", "Image built from deploy/Dockerfile: container mode.")
  executor_image_uri: str = option(
      "", f"Package mode's prebuilt image, e.g. .../{NEWEST_PREBUILT_TF}:latest (required: none "
      "has setup.py's TensorFlow).")
  allow_cross_region_image: bool = option(
      False, "Accept an Artifact Registry image stored outside --region.")
  display_name: str = option("mnist-dist", "Prefix of the jobs' display names.")
  machine_type: str = option("n1-standard-8", "Compute Engine machine type.")
  accelerator_type: str = option(
      "", "Vertex AI AcceleratorType name for N1 machines (default NVIDIA_TESLA_T4); A2, A3, G2 "
      "machines bring their own.")
  gpus_per_machine: int = option(4, "GPUs of the multi_gpu job (0: CPU-only, one replica per "
                                 "vCPU).")
  workers: int = option(2, "multi_worker: machines, chief included.")
  gpus_per_worker: int = option(1, "multi_worker: GPUs each (0: CPU-only).")
  evaluator: bool = option(
      False, "multi_worker: add worker pool 3, a side-car evaluator that evaluates each new "
      "checkpoint (same machine and arguments as the workers).")
  timeout_s: int = option(24 * 3600, "scheduling.timeout: the job (or each trial) fails after "
                          "this, restarts included.")
  restart_job_on_worker_restart: bool = option(
      True, "Restart all workers when one restarts (preemption recovery).")
  disable_retries: bool = option(
      False, "scheduling.disableRetries: no retries after internal errors (also turns off "
      "--restart_job_on_worker_restart).")
  max_job_restarts: int = option(
      DEFAULT_MAX_JOB_RESTARTS, "Passed to the trainer: after this many restarts without a "
      "finished run the chief exits 7 (0: no cap).")
  spot: bool = option(False, "Use Spot VMs (cheaper, preemptible).")
  flex_start: bool = option(False, "FLEX_START: queue for GPUs with Dynamic Workload Scheduler.")
  max_wait_s: int = option(0, "--flex_start: scheduling.maxWaitDuration (0: Vertex AI's "
                           "default).")
  service_account: str = option("", "Service account the job runs as.")
  network: str = option("", "VPC (projects/NUM/global/networks/NAME) to peer with.")
  tensorboard: str = option("", "Vertex AI TensorBoard (projects/P/locations/R/tensorboards/ID) "
                            "the job streams its logs to.")
  enable_web_access: bool = option(False, "Interactive shell into the training containers "
                                   "(jobSpec.enableWebAccess).")
  max_trial_count: int = option(16, "hp_tuning: trials.")
  parallel_trial_count: int = option(4, "hp_tuning: trials at once.")
  max_failed_trial_count: int = option(4, "hp_tuning: failed trials before the study stops.")
  lr_min: float = option(1e-4, "hp_tuning: lowest learning rate.")
  lr_max: float = option(3e-2, "hp_tuning: highest learning rate.")
  batch_sizes: tuple = option((64, 128, 256, 512), "hp_tuning: global batch sizes to try.")
  trainer_args: tuple = ()  # after `--` on the command line, not a flag

  def __post_init__(self):
    validate(self)


def _require_gs(name: str, value: str) -> None:
  if value and not value.startswith("gs://"):
    raise SpecError(f"--{name}={value!r} must be a gs:// URI.")


def _require_positive(o: Options, names: Sequence[str]) -> None:
  for name in names:
    if getattr(o, name) <= 0:
      raise SpecError(f"--{name} must be > 0, got {getattr(o, name)}.")


def _require_non_negative(o: Options, names: Sequence[str]) -> None:
  for name in names:
    if getattr(o, name) < 0:
      raise SpecError(f"--{name} must be >= 0, got {getattr(o, name)}.")


def validate(o: Options) -> None:
  """Rejects options Vertex AI or the trainer would reject later, after paying for machines."""
  if not o.output_dir:
    raise SpecError("--output_dir is required: the gs:// prefix under which Vertex AI sets "
                    "AIP_MODEL_DIR, AIP_CHECKPOINT_DIR and AIP_TENSORBOARD_LOG_DIR.")
  for name in ("output_dir", "staging_bucket", "package_uri"):
    _require_gs(name, getattr(o, name))
  _require_positive(o, ("timeout_s", "max_trial_count", "parallel_trial_count", "lr_min"))
  _require_non_negative(o, ("gpus_per_machine", "gpus_per_worker", "max_failed_trial_count",
                            "max_job_restarts", "max_wait_s"))
  if o.workers < 2:
    raise SpecError(f"--workers={o.workers}: a multi-worker job needs at least 2.")
  if o.parallel_trial_count > o.max_trial_count:
    raise SpecError(f"--parallel_trial_count={o.parallel_trial_count} exceeds "
                    f"--max_trial_count={o.max_trial_count}.")
  if o.lr_max <= o.lr_min:
    raise SpecError(f"--lr_max={o.lr_max} must be above --lr_min={o.lr_min}.")
  if not o.batch_sizes or any(b <= 0 for b in o.batch_sizes):
    raise SpecError(f"--batch_sizes must be positive integers, got {list(o.batch_sizes)}.")
  _validate_scheduling(o)
  _validate_regions(o)
  try:
    # Vertex AI sets AIP_MODEL_DIR per job (and per trial); an explicit one would be shared.
    trainer_args.reject(o.trainer_args, ("model_dir",),
                        "Vertex AI sets $AIP_MODEL_DIR from --output_dir; the trainer uses it.")
    trainer_args.reject(o.trainer_args, ("strategy",), "--job picks the strategy.")
    trainer_args.reject(o.trainer_args, ("max_job_restarts",),
                        "use this tool's --max_job_restarts.")
  except trainer_args.ArgsError as e:
    raise SpecError(str(e)) from None


def _validate_scheduling(o: Options) -> None:
  """Scheduling fields as the aiplatform_v1 Scheduling message documents them."""
  if o.spot and o.flex_start:
    raise SpecError("--spot and --flex_start are two scheduling strategies: pick one.")
  if o.max_wait_s and not o.flex_start:
    raise SpecError(f"--max_wait_s={o.max_wait_s}: Vertex AI only honours "
                    "scheduling.maxWaitDuration with the FLEX_START strategy; add --flex_start "
                    "(Spot jobs start or fail at once).")


def _validate_regions(o: Options) -> None:
  """TensorBoard and images must sit with the job: cross-region pulls are slow and billed."""
  if not _REGION_RE.match(o.region):
    raise SpecError(f"--region={o.region!r}: use a Vertex AI region such as us-central1.")
  if o.tensorboard:
    match = _TENSORBOARD_RE.match(o.tensorboard)
    if not match:
      raise SpecError(f"--tensorboard={o.tensorboard!r}: use the resource name "
                      "projects/PROJECT/locations/REGION/tensorboards/ID.")
    if match.group(1) != o.region:
      raise SpecError(f"--tensorboard is in {match.group(1)} but the job runs in "
                      f"--region={o.region}: create or pick a TensorBoard in {o.region}.")
    if not o.service_account:
      raise SpecError("--tensorboard needs --service_account: the job uploads its logs as that "
                      "account (roles/aiplatform.user and storage access on the output bucket).")
  for name in ("image_uri", "executor_image_uri"):
    image = getattr(o, name)
    location = artifact_location(image)
    if location and not o.allow_cross_region_image and not region_matches(location, o.region):
      raise SpecError(f"--{name}={image!r} is stored in {location}, the job runs in "
                      f"--region={o.region}: use {suggested_host(o.region)}/... (or pass "
                      "--allow_cross_region_image).")


def artifact_location(image: str) -> Optional[str]:
  """'us' for us-docker.pkg.dev/..., 'europe-west4' for europe-west4-docker.pkg.dev/...;
  None for registries whose location the name does not tell."""
  match = re.match(r"^([a-z0-9-]+)-docker\.pkg\.dev/", image)
  return match.group(1) if match else None


def region_matches(location: str, region: str) -> bool:
  """A repository serves a region from the region itself or the multi-region that holds it.
  Regions outside us-, europe- and asia- have no multi-region of their own: any will do."""
  if location == region:
    return True
  if location not in MULTI_REGIONS:
    return False
  home = region.split("-", 1)[0]
  return home == location or home not in MULTI_REGIONS


def suggested_host(region: str) -> str:
  home = region.split("-", 1)[0]
  return f"{home if home in MULTI_REGIONS else 'us'}-docker.pkg.dev"


def package_version(setup_py: pathlib.Path = REPO_ROOT / "setup.py") -> str:
  """setup.py's version= literal, read without running setup.py."""
  for node in ast.walk(ast.parse(setup_py.read_text())):
    if isinstance(node, ast.keyword) and node.arg == "version":
      return ast.literal_eval(node.value)
  raise SpecError(f"{setup_py} has no version= literal.")


def tensorflow_pin(setup_py: pathlib.Path = REPO_ROOT / "setup.py") -> str:
  """setup.py's tensorflow requirement, e.g. 'tensorflow>=2.21,<2.22'."""
  for node in ast.walk(ast.parse(setup_py.read_text())):
    if isinstance(node, ast.keyword) and node.arg == "install_requires":
      for requirement in ast.literal_eval(node.value):
        if re.match(r"^tensorflow\s*[<>=!~]", requirement):
          return requirement
  raise SpecError(f"{setup_py} has no tensorflow requirement.")


def sdist_name() -> str:
  return f"{SDIST_PREFIX}-{package_version()}.tar.gz"


def package_uri(o: Options) -> str:
  if o.package_uri:
    return o.package_uri
  if not o.staging_bucket:
    raise SpecError("Python-package mode needs --staging_bucket=gs://... (where the sdist is "
                    "uploaded) or --package_uri; or use --image_uri for the custom container.")
  return f"{o.staging_bucket.rstrip('/')}/packages/{sdist_name()}"


def executor_image(o: Options) -> str:
  """Package mode's image; never a silent default, since none matches setup.py's TensorFlow."""
  if o.executor_image_uri:
    return o.executor_image_uri
  raise SpecError(
      f"Package mode needs --executor_image_uri: Vertex AI has no prebuilt training image with "
      f"{tensorflow_pin()} (newest: {NEWEST_PREBUILT_TF}), so pip would replace its TensorFlow "
      "at every replica start. Use container mode (--image_uri=IMAGE built from "
      "deploy/Dockerfile), or accept the reinstall with --executor_image_uri="
      f"{suggested_host(o.region)}/vertex-ai/training/{NEWEST_PREBUILT_TF}:latest.")


def executor_tf_mismatch(o: Options) -> Optional[str]:
  """A warning when the executor image's TensorFlow is not the one setup.py pins."""
  match = PREBUILT_IMAGE_RE.search(o.executor_image_uri)
  pinned = re.search(r">=\s*(\d+)\.(\d+)", tensorflow_pin())
  if not match or not pinned or match.groups() == pinned.groups():
    return None
  return (f"--executor_image_uri has TensorFlow {'.'.join(match.groups())}; installing the sdist "
          f"replaces it with {tensorflow_pin()} at every replica start (minutes, and a "
          "TensorFlow the image's CUDA was not built for). Prefer --image_uri.")


# ---- Machines and accelerators ----

def _gpus(o: Options, kind: str) -> tuple:
  """(GPUs per machine, the flag that sets them) for a job kind."""
  return {"one_gpu": (1, "the one_gpu job"), "hp_tuning": (1, "the hp_tuning job"),
          "multi_gpu": (o.gpus_per_machine, "--gpus_per_machine"),
          "multi_worker": (o.gpus_per_worker, "--gpus_per_worker")}[kind]


def _fixed_offers(accelerator: str) -> str:
  """'1 (g2-standard-4, ...), 2 (g2-standard-24), ...' for an accelerator-optimized GPU."""
  by_count = {}
  for machine, (gpu, count) in FIXED_GPU_MACHINES.items():
    if gpu == accelerator and machine not in UNSUPPORTED_MACHINES:
      by_count.setdefault(count, []).append(machine)
  return ", ".join(f"{count} ({', '.join(machines)})"
                   for count, machines in sorted(by_count.items()))


def _check_fixed_machine(o: Options, gpus: int, flag: str) -> str:
  accelerator, count = FIXED_GPU_MACHINES[o.machine_type]
  if o.accelerator_type and o.accelerator_type != accelerator:
    raise SpecError(f"--machine_type={o.machine_type} comes with {accelerator}, not "
                    f"--accelerator_type={o.accelerator_type}; drop --accelerator_type.")
  if gpus != count:
    raise SpecError(f"--machine_type={o.machine_type} has exactly {count} {accelerator}, but "
                    f"{flag} asks for {gpus}. Valid {accelerator} counts: "
                    f"{_fixed_offers(accelerator)}.")
  return accelerator


def _check_n1_machine(o: Options, gpus: int, flag: str) -> str:
  accelerator = o.accelerator_type or N1_DEFAULT_GPU
  if accelerator in RETIRED_GPUS:
    raise SpecError(f"--accelerator_type={accelerator} {RETIRED_GPUS[accelerator]}: use one of "
                    f"{', '.join(sorted(N1_GPU_COUNTS))}.")
  if accelerator not in N1_GPU_COUNTS:
    fixed = _fixed_offers(accelerator)
    where = f"; {accelerator} comes with: {fixed}" if fixed else ""
    raise SpecError(f"--accelerator_type={accelerator} does not attach to "
                    f"--machine_type={o.machine_type}: N1 machines take "
                    f"{', '.join(sorted(N1_GPU_COUNTS))}{where}.")
  if gpus not in N1_GPU_COUNTS[accelerator]:
    raise SpecError(f"{flag} asks for {gpus} {accelerator} on {o.machine_type}; valid counts: "
                    f"{', '.join(map(str, N1_GPU_COUNTS[accelerator]))}.")
  _check_n1_vcpus(o, accelerator, gpus, flag)
  return accelerator


def _check_n1_vcpus(o: Options, accelerator: str, gpus: int, flag: str) -> None:
  """Compute Engine refuses an N1 VM with more vCPUs than its GPU count allows (N1_MAX_VCPUS)."""
  family, vcpus = _N1_RE.match(o.machine_type).groups()
  limit = N1_MAX_VCPUS[accelerator][gpus]
  if int(vcpus) <= limit:
    return
  fixes = []
  smaller = max(n for n in N1_SIZES if n <= limit)
  fixes.append(f"--machine_type=n1-{family}-{smaller}")
  more = [count for count, cap in sorted(N1_MAX_VCPUS[accelerator].items())
          if count > gpus and cap >= int(vcpus)]
  if more and flag.startswith("--"):
    fixes.append(f"{flag}={more[0]} (up to {N1_MAX_VCPUS[accelerator][more[0]]} vCPUs)")
  raise SpecError(f"--machine_type={o.machine_type} has {vcpus} vCPUs, but Compute Engine "
                  f"attaches {gpus} x {accelerator} (--accelerator_type; the count from {flag}) "
                  f"only to N1 machines of at most {limit} vCPUs: use {' or '.join(fixes)}.")


def machine_spec(o: Options, kind: str) -> dict:
  """The MachineSpec for a job kind, after checking it is one Vertex AI would accept."""
  gpus, flag = _gpus(o, kind)
  if o.machine_type in UNSUPPORTED_MACHINES:
    raise SpecError(f"--machine_type={o.machine_type} {UNSUPPORTED_MACHINES[o.machine_type]}")
  if not gpus:
    if o.machine_type in FIXED_GPU_MACHINES:
      raise SpecError(f"{flag}=0 but --machine_type={o.machine_type} always has GPUs: use a CPU "
                      "machine type such as n1-standard-8 for a CPU-only job.")
    if o.accelerator_type:
      raise SpecError(f"{flag}=0 is a CPU-only job: drop --accelerator_type.")
    return {"machineType": o.machine_type}
  if o.machine_type in FIXED_GPU_MACHINES:
    accelerator = _check_fixed_machine(o, gpus, flag)
  elif _N1_RE.match(o.machine_type):
    accelerator = _check_n1_machine(o, gpus, flag)
  else:
    raise SpecError(f"--machine_type={o.machine_type} takes no GPUs on Vertex AI: use an N1 "
                    "machine with --accelerator_type, or one of "
                    f"{', '.join(sorted(set(FIXED_GPU_MACHINES) - set(UNSUPPORTED_MACHINES)))}.")
  return {"machineType": o.machine_type, "acceleratorType": accelerator,
          "acceleratorCount": gpus}


def machine_vcpus(machine_type: str) -> Optional[int]:
  match = _VCPUS_RE.match(machine_type)
  return int(match.group(1) or match.group(2)) if match else None


def _cpu_devices(o: Options) -> int:
  """Replicas of a CPU-only multi_gpu job: --num_cpu_devices, else one per vCPU (the trainer's
  own default on a single CPU-only task), passed explicitly so the batch check is exact."""
  given = trainer_args.flag_value(o.trainer_args, "num_cpu_devices")
  if given:
    try:
      return max(1, int(given))
    except ValueError:
      raise SpecError(f"--num_cpu_devices={given!r} after `--` is not an integer.") from None
  vcpus = machine_vcpus(o.machine_type)
  if not vcpus:
    raise SpecError(f"Cannot tell the vCPUs of --machine_type={o.machine_type}: pass "
                    "--num_cpu_devices=N after `--` for the CPU-only multi_gpu job.")
  return vcpus


def _replicas_per_job(o: Options, kind: str) -> int:
  if kind == "multi_gpu":
    return o.gpus_per_machine or _cpu_devices(o)
  if kind == "multi_worker":
    return o.workers * max(o.gpus_per_worker, 1)
  return 1


def _check_batch(o: Options, kind: str) -> None:
  """The global batch must split evenly over replicas; the trainer would exit 2 on a paid VM."""
  replicas = _replicas_per_job(o, kind)
  given = trainer_args.flag_value(o.trainer_args, "global_batch_size")
  batch = int(given) if given else trainer_args.trainer_default("global_batch_size")
  if batch % replicas:
    raise SpecError(f"--global_batch_size={batch} does not divide by the {replicas} replicas "
                    f"of the {kind} job; pass a multiple of {replicas} after `--`.")


def _trainer_argv(o: Options, kind: str) -> list:
  args = [f"--strategy={STRATEGY_OF[kind]}", f"--max_job_restarts={o.max_job_restarts}"]
  cpu_only_mirrored = kind == "multi_gpu" and not o.gpus_per_machine
  if cpu_only_mirrored and not trainer_args.flag_value(o.trainer_args, "num_cpu_devices"):
    args.append(f"--num_cpu_devices={_cpu_devices(o)}")
  return [*args, *o.trainer_args]


def _code_spec(o: Options, mode: str, args: list) -> dict:
  if mode == "container":
    if not o.image_uri:
      raise SpecError("Container mode needs --image_uri (built from deploy/Dockerfile).")
    # The image's ENTRYPOINT is `python -m trainer.task`; Vertex AI appends args to it.
    return {"containerSpec": {"imageUri": o.image_uri, "args": args}}
  uri = package_uri(o)  # First: without a package there is no package mode to configure.
  return {"pythonPackageSpec": {"executorImageUri": executor_image(o), "packageUris": [uri],
                                "pythonModule": PYTHON_MODULE, "args": args}}


def _pool(o: Options, kind: str, mode: str, replicas: int, args: list) -> dict:
  return {"machineSpec": machine_spec(o, kind), "replicaCount": replicas,
          **_code_spec(o, mode, args)}


def _pools(o: Options, kind: str, mode: str) -> list:
  args = _trainer_argv(o, kind)
  if kind == "multi_worker":
    # Pool 0 is the chief (exactly one replica); pool 1 holds the other workers.
    pools = [_pool(o, kind, mode, 1, args), _pool(o, kind, mode, o.workers - 1, args)]
    if o.evaluator:
      # Pool 3 is the evaluator; pool 2 (parameter servers) stays an empty placeholder, as
      # "all worker pools except the first one are optional and can be skipped by providing an
      # empty value" (CustomJobSpec.workerPoolSpecs; google-cloud-aiplatform's
      # worker_spec_utils.py fills skipped pools with {} too). It runs the workers' arguments
      # and machine; TF_CONFIG/CLUSTER_SPEC make it the evaluator (trainer/runtime/cluster.py).
      pools += [{}, _pool(o, kind, mode, 1, args)]
    return pools
  return [_pool(o, kind, mode, 1, args)]


def check_job(o: Options, kind: str) -> None:
  """Options that fit some job kinds only, checked for the one job being submitted."""
  if o.evaluator and kind != "multi_worker":
    raise SpecError(f"--evaluator adds worker pool 3 to the multi_worker job, not to {kind}: "
                    "use --job=multi_worker (or drop --evaluator).")


def _scheduling(o: Options) -> dict:
  # Restarting every worker when one restarts lets MultiWorkerMirroredStrategy rebuild its
  # collective group and resume from the last checkpoint after a preemption. disableRetries
  # turns that off too (aiplatform_v1 Scheduling.disable_retries), so say so in the body.
  scheduling = {"timeout": f"{o.timeout_s}s",
                "restartJobOnWorkerRestart": o.restart_job_on_worker_restart
                                             and not o.disable_retries}
  if o.disable_retries:
    scheduling["disableRetries"] = True
  if o.spot:
    scheduling["strategy"] = "SPOT"
  if o.flex_start:
    scheduling["strategy"] = "FLEX_START"
    if o.max_wait_s:
      scheduling["maxWaitDuration"] = f"{o.max_wait_s}s"
  return scheduling


def _job_spec(o: Options, kind: str, mode: str) -> dict:
  spec = {"workerPoolSpecs": _pools(o, kind, mode),
          "scheduling": _scheduling(o),
          # AIP_MODEL_DIR = <prefix>/model/, AIP_CHECKPOINT_DIR = <prefix>/checkpoints/,
          # AIP_TENSORBOARD_LOG_DIR = <prefix>/logs/ (per trial: <prefix>/<trial id>/...):
          # aiplatform_v1 CustomJobSpec.base_output_directory.
          "baseOutputDirectory": {"outputUriPrefix": f"{o.output_dir.rstrip('/')}/{kind}"}}
  for field, value in (("serviceAccount", o.service_account), ("network", o.network),
                       ("tensorboard", o.tensorboard)):
    if value:
      spec[field] = value
  if o.enable_web_access:
    spec["enableWebAccess"] = True
  return spec


def _labels(kind: str, mode: str) -> dict:
  return {"app": "mnist-dist-trainer", "job-kind": kind.replace("_", "-"), "mode": mode}


def custom_job(o: Options, kind: str, mode: str) -> dict:
  """The CustomJob request body (REST JSON field names) for one_gpu, multi_gpu or multi_worker."""
  if kind not in STRATEGY_OF or kind == "hp_tuning":
    raise SpecError(f"Unknown custom job kind {kind!r}.")
  job_spec = _job_spec(o, kind, mode)  # Machine errors first: they change the replica count.
  _check_batch(o, kind)
  return {"displayName": f"{o.display_name}-{kind.replace('_', '-')}",
          "labels": _labels(kind, mode), "jobSpec": job_spec}


def _study_spec(o: Options) -> dict:
  return {
      "metrics": [{"metricId": HP_METRIC, "goal": "MAXIMIZE"}],
      "parameters": [
          {"parameterId": "learning_rate", "scaleType": "UNIT_LOG_SCALE",
           "doubleValueSpec": {"minValue": o.lr_min, "maxValue": o.lr_max}},
          # Categorical, not discrete: Vertex AI passes discrete values as "128.0", which the
          # trainer's integer flag rejects; categorical strings arrive verbatim.
          {"parameterId": "global_batch_size",
           "categoricalValueSpec": {"values": [str(b) for b in sorted(o.batch_sizes)]}},
      ],
      # A trial killed by preemption must not count as a bad learning rate.
      "measurementSelectionType": "LAST_MEASUREMENT",
  }


def hp_tuning_job(o: Options, mode: str) -> dict:
  """The HyperparameterTuningJob request body; each trial is a one-GPU job."""
  try:
    # Vertex AI appends --learning_rate=... --global_batch_size=... to every trial's args.
    trainer_args.reject(o.trainer_args, TUNED_FLAGS, "the tuning job sets it per trial.")
  except trainer_args.ArgsError as e:
    raise SpecError(str(e)) from None
  return {"displayName": f"{o.display_name}-hp-tuning", "labels": _labels("hp_tuning", mode),
          "studySpec": _study_spec(o), "maxTrialCount": o.max_trial_count,
          "parallelTrialCount": o.parallel_trial_count,
          "maxFailedTrialCount": o.max_failed_trial_count,
          "trialJobSpec": _job_spec(o, "hp_tuning", mode)}


def build(o: Options, kind: str, mode: str) -> dict:
  if mode not in MODES:
    raise SpecError(f"Unknown mode {mode!r}: use one of {', '.join(MODES)}.")
  if kind == "hp_tuning":
    return hp_tuning_job(o, mode)
  return custom_job(o, kind, mode)


def file_name(kind: str, mode: str) -> str:
  stem = "hp_tuning_job" if kind == "hp_tuning" else f"custom_job_{kind}"
  return f"{stem}{'_container' if mode == 'container' else ''}.json"


def available_modes(o: Options) -> list:
  modes = [m for m, ok in (("package", o.staging_bucket or o.package_uri),
                           ("container", o.image_uri)) if ok]
  if not modes:
    raise SpecError("Nothing to render: give --image_uri (custom-container mode) and/or "
                    "--staging_bucket with --executor_image_uri (python-package mode).")
  return modes


def api_type(kind: str):
  """The google-cloud-aiplatform request type for a job kind."""
  from google.cloud import aiplatform_v1  # Only needed to check or send, not to render.
  return aiplatform_v1.HyperparameterTuningJob if kind == "hp_tuning" else aiplatform_v1.CustomJob


def check_against_api(body: dict, kind: str) -> None:
  """Parses body into the API type (unknown field or enum -> SpecError) when the library exists."""
  try:
    message_type = api_type(kind)
  except ImportError:
    logging.info("google-cloud-aiplatform is not installed; request bodies are not type-checked.")
    return
  from google.protobuf import json_format
  try:
    json_format.ParseDict(body, message_type.pb(message_type()))
  except json_format.ParseError as e:
    raise SpecError(f"The {kind} request body does not match the Vertex AI API: {e}") from None


def render_all(o: Options, out_dir: str) -> list:
  """Writes every job kind in every mode the options allow; returns the paths written."""
  modes = available_modes(o)
  bodies = {}
  for mode in modes:  # Build everything first: a bad option must leave no partial output.
    for kind in JOB_KINDS:
      body = build(o, kind, mode)
      check_against_api(body, kind)
      bodies[file_name(kind, mode)] = body
  os.makedirs(out_dir, exist_ok=True)
  paths = []
  for name, body in bodies.items():
    path = os.path.join(out_dir, name)
    with open(path, "w") as f:
      f.write(json.dumps(body, indent=2) + "\n")
    paths.append(path)
  return paths


def send_commands(body: dict, kind: str, mode: str, project: str, region: str) -> list:
  """Shell commands that send a saved request body: curl to the REST method
  (projects.locations.customJobs.create / hyperparameterTuningJobs.create, v1) and, for custom
  jobs, `gcloud ai custom-jobs create`, whose --config takes only the CustomJobSpec."""
  body_file = file_name(kind, mode)
  collection = "hyperparameterTuningJobs" if kind == "hp_tuning" else "customJobs"
  url = (f"https://{region}-aiplatform.googleapis.com/v1/projects/{project}/locations/{region}/"
         f"{collection}")
  commands = [
      "curl -sS -X POST -H \"Authorization: Bearer $(gcloud auth print-access-token)\" "
      "-H 'Content-Type: application/json; charset=utf-8' "
      f"--data @{body_file} {shlex.quote(url)}"]
  if kind != "hp_tuning":
    spec_file = body_file.replace(".json", ".job_spec.json")
    labels = ",".join(f"{k}={v}" for k, v in body["labels"].items())
    commands += [
        "python3 -c 'import json, sys; json.dump(json.load(sys.stdin)[\"jobSpec\"], sys.stdout)' "
        f"< {body_file} > {spec_file}",
        f"gcloud ai custom-jobs create --project={project} --region={region} "
        f"--display-name={shlex.quote(body['displayName'])} --labels={labels} "
        f"--config={spec_file}"]
  return commands


def _upload_sdist(o: Options, project: str) -> None:
  local = REPO_ROOT / "dist" / sdist_name()
  if not local.exists():
    raise SpecError(f"{local} is missing: run `make package` first.")
  from google.cloud import storage
  bucket, _, blob = package_uri(o)[len("gs://"):].partition("/")
  storage.Client(project=project).bucket(bucket).blob(blob).upload_from_filename(str(local))
  logging.info("Uploaded %s to %s", local, package_uri(o))


def submit(o: Options, kind: str, mode: str, project: str) -> str:
  """Creates the job on Vertex AI and returns its resource name (thin: needs a real project)."""
  from google.cloud import aiplatform_v1
  body = build(o, kind, mode)
  check_against_api(body, kind)
  if mode == "package" and not o.package_uri:
    _upload_sdist(o, project)
  client = aiplatform_v1.JobServiceClient(
      client_options={"api_endpoint": f"{o.region}-aiplatform.googleapis.com"})
  parent = f"projects/{project}/locations/{o.region}"
  message = api_type(kind).from_json(json.dumps(body))
  if kind == "hp_tuning":
    return client.create_hyperparameter_tuning_job(
        parent=parent, hyperparameter_tuning_job=message).name
  return client.create_custom_job(parent=parent, custom_job=message).name


# ---- Command line ----

FLAGS = flags.FLAGS


def _define_flags() -> None:
  """Defined only when run as a program, so tests can import this module next to others."""
  flags.DEFINE_enum("job", "one_gpu", JOB_KINDS, "submit: which job to create.")
  flags.DEFINE_boolean("dry_run", False, "submit: print the request body JSON, create nothing.")
  flags.DEFINE_string("out", None, "render: directory for the JSON files.")
  flags.DEFINE_string("project", None, "submit: Google Cloud project ID.")
  option_flags.define_flags(Options)


def _options_from_flags(extra_args: Sequence[str]) -> Options:
  return Options(**option_flags.values_from_flags(Options, FLAGS, error=SpecError),
                 trainer_args=tuple(extra_args))


def _mode(o: Options) -> str:
  return "container" if o.image_uri else "package"


def _warn_package_mode(o: Options, modes: Sequence[str]) -> None:
  warning = executor_tf_mismatch(o) if "package" in modes else None
  if warning:
    sys.stderr.write(f"deploy.vertex: warning: {warning}\n")


def _dry_run(o: Options) -> int:
  check_job(o, FLAGS.job)
  body = build(o, FLAGS.job, _mode(o))
  check_against_api(body, FLAGS.job)
  _warn_package_mode(o, [_mode(o)])
  print(json.dumps(body, indent=2))
  sys.stderr.write(f"deploy.vertex: save the body above as {file_name(FLAGS.job, _mode(o))}, "
                   "then send it with:\n")
  for command in send_commands(body, FLAGS.job, _mode(o), FLAGS.project or "PROJECT", o.region):
    sys.stderr.write(f"  {command}\n")
  return 0


def _run(command: str, extra_args: Sequence[str]) -> int:
  o = _options_from_flags(extra_args)
  if command == "render":
    if not FLAGS.out:
      raise SpecError("render needs --out=DIR.")
    _warn_package_mode(o, available_modes(o))
    for path in render_all(o, FLAGS.out):
      print(path)
    return 0
  if FLAGS.dry_run:
    return _dry_run(o)
  if not FLAGS.project:
    raise SpecError("submit needs --project (or --dry_run to only print the request).")
  check_job(o, FLAGS.job)
  _warn_package_mode(o, [_mode(o)])
  print(submit(o, FLAGS.job, _mode(o), FLAGS.project))
  return 0


def main(argv: Sequence[str]) -> Optional[int]:
  if len(argv) < 2 or argv[1] not in ("submit", "render"):
    sys.stderr.write("deploy.vertex: error: the first argument must be `submit` or `render`.\n"
                     f"{__doc__}")
    return 2
  try:
    return _run(argv[1], argv[2:])
  except SpecError as e:
    sys.stderr.write(f"deploy.vertex: error: {e}\n")
    return 2


if __name__ == "__main__":
  _define_flags()
  app.run(main)
