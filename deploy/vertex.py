"""Vertex AI custom-job and hyperparameter-tuning specs for the trainer: render them, or submit one.

Usage (TRAINER_ARGS after `--` go to trainer.task; --model_dir and --strategy are set here):
  python -m deploy.vertex render --out=DIR --output_dir=gs://B/runs/R
      [--staging_bucket=gs://S] [--image_uri=IMAGE] [-- TRAINER_ARGS]
  python -m deploy.vertex submit --job={one_gpu,multi_gpu,multi_worker,hp_tuning}
      --output_dir=gs://B/runs/R (--staging_bucket=gs://S | --image_uri=IMAGE)
      [--dry_run | --project=P --region=R] [-- TRAINER_ARGS]

`submit --dry_run` prints the REST request body; `render` writes every spec as one JSON file each.
"""

import ast
import dataclasses
import json
import os
import pathlib
import sys
from typing import Optional, Sequence

from absl import app
from absl import flags
from absl import logging

from deploy import trainer_args

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
# setup.py's project name as setuptools spells it in sdist file names.
SDIST_PREFIX = "mnist_dist_trainer"
PYTHON_MODULE = "trainer.task"
# Vertex AI's newest prebuilt TensorFlow GPU training image. There is no 2.21 build, so installing
# the sdist upgrades TensorFlow to setup.py's pin when the job starts; the custom container
# (--image_uri) runs the pinned version from the start.
DEFAULT_EXECUTOR_IMAGE = "us-docker.pkg.dev/vertex-ai/training/tf-gpu.2-17.py310:latest"
JOB_KINDS = ("one_gpu", "multi_gpu", "multi_worker", "hp_tuning")
MODES = ("package", "container")
STRATEGY_OF = {"one_gpu": "one_device", "multi_gpu": "mirrored",
               "multi_worker": "multi_worker_mirrored", "hp_tuning": "one_device"}
HP_METRIC = "test_accuracy"
TUNED_FLAGS = ("learning_rate", "global_batch_size")


class SpecError(ValueError):
  """Options that cannot make a valid job; the message names the flag and the fix."""


@dataclasses.dataclass(frozen=True)
class Options:
  """Everything a job spec depends on; built from flags (or directly by tests)."""

  output_dir: str
  staging_bucket: str = ""
  package_uri: str = ""
  image_uri: str = ""
  executor_image_uri: str = DEFAULT_EXECUTOR_IMAGE
  display_name: str = "mnist-dist"
  machine_type: str = "n1-standard-8"
  accelerator_type: str = "NVIDIA_TESLA_T4"
  gpus_per_machine: int = 4
  workers: int = 2
  gpus_per_worker: int = 1
  timeout_s: int = 24 * 3600
  restart_job_on_worker_restart: bool = True
  spot: bool = False
  service_account: str = ""
  network: str = ""
  max_trial_count: int = 16
  parallel_trial_count: int = 4
  max_failed_trial_count: int = 4
  lr_min: float = 1e-4
  lr_max: float = 3e-2
  batch_sizes: tuple = (64, 128, 256, 512)
  trainer_args: tuple = ()

  def __post_init__(self):
    validate(self)


def _require_gs(name: str, value: str) -> None:
  if value and not value.startswith("gs://"):
    raise SpecError(f"--{name}={value!r} must be a gs:// URI.")


def _require_positive(o: Options, names: Sequence[str]) -> None:
  for name in names:
    if getattr(o, name) <= 0:
      raise SpecError(f"--{name} must be > 0, got {getattr(o, name)}.")


def validate(o: Options) -> None:
  """Rejects options Vertex AI or the trainer would reject later, after paying for machines."""
  if not o.output_dir:
    raise SpecError("--output_dir is required: the gs:// prefix under which Vertex AI sets "
                    "AIP_MODEL_DIR.")
  for name in ("output_dir", "staging_bucket", "package_uri"):
    _require_gs(name, getattr(o, name))
  _require_positive(o, ("gpus_per_machine", "gpus_per_worker", "timeout_s", "max_trial_count",
                        "parallel_trial_count", "lr_min"))
  if o.workers < 2:
    raise SpecError(f"--workers={o.workers}: a multi-worker job needs at least 2.")
  if o.max_failed_trial_count < 0:
    raise SpecError("--max_failed_trial_count must be >= 0.")
  if o.parallel_trial_count > o.max_trial_count:
    raise SpecError(f"--parallel_trial_count={o.parallel_trial_count} exceeds "
                    f"--max_trial_count={o.max_trial_count}.")
  if o.lr_max <= o.lr_min:
    raise SpecError(f"--lr_max={o.lr_max} must be above --lr_min={o.lr_min}.")
  if not o.batch_sizes or any(b <= 0 for b in o.batch_sizes):
    raise SpecError(f"--batch_sizes must be positive integers, got {list(o.batch_sizes)}.")
  try:
    # Vertex AI sets AIP_MODEL_DIR per job (and per trial); an explicit one would be shared.
    trainer_args.reject(o.trainer_args, ("model_dir",),
                        "Vertex AI sets $AIP_MODEL_DIR from --output_dir; the trainer uses it.")
    trainer_args.reject(o.trainer_args, ("strategy",), "--job picks the strategy.")
  except trainer_args.ArgsError as e:
    raise SpecError(str(e)) from None


def package_version(setup_py: pathlib.Path = REPO_ROOT / "setup.py") -> str:
  """setup.py's version= literal, read without running setup.py."""
  for node in ast.walk(ast.parse(setup_py.read_text())):
    if isinstance(node, ast.keyword) and node.arg == "version":
      return ast.literal_eval(node.value)
  raise SpecError(f"{setup_py} has no version= literal.")


def sdist_name() -> str:
  return f"{SDIST_PREFIX}-{package_version()}.tar.gz"


def package_uri(o: Options) -> str:
  if o.package_uri:
    return o.package_uri
  if not o.staging_bucket:
    raise SpecError("Python-package mode needs --staging_bucket=gs://... (where the sdist is "
                    "uploaded) or --package_uri; or use --image_uri for the custom container.")
  return f"{o.staging_bucket.rstrip('/')}/packages/{sdist_name()}"


def _replicas_per_job(o: Options, kind: str) -> int:
  return {"one_gpu": 1, "hp_tuning": 1, "multi_gpu": o.gpus_per_machine,
          "multi_worker": o.workers * o.gpus_per_worker}[kind]


def _check_batch(o: Options, kind: str) -> None:
  """The global batch must split evenly over replicas; the trainer would exit 2 on a paid VM."""
  replicas = _replicas_per_job(o, kind)
  given = trainer_args.flag_value(o.trainer_args, "global_batch_size")
  batch = int(given) if given else trainer_args.trainer_default("global_batch_size")
  if batch % replicas:
    raise SpecError(f"--global_batch_size={batch} does not divide by the {replicas} replicas "
                    f"of the {kind} job; pass a multiple of {replicas} after `--`.")


def _trainer_argv(o: Options, kind: str) -> list:
  return [f"--strategy={STRATEGY_OF[kind]}", *o.trainer_args]


def _code_spec(o: Options, mode: str, args: list) -> dict:
  if mode == "container":
    if not o.image_uri:
      raise SpecError("Container mode needs --image_uri (built from deploy/Dockerfile).")
    # The image's ENTRYPOINT is `python -m trainer.task`; Vertex AI appends args to it.
    return {"containerSpec": {"imageUri": o.image_uri, "args": args}}
  return {"pythonPackageSpec": {"executorImageUri": o.executor_image_uri,
                                "packageUris": [package_uri(o)],
                                "pythonModule": PYTHON_MODULE, "args": args}}


def _pool(o: Options, mode: str, replicas: int, gpus: int, args: list) -> dict:
  machine = {"machineType": o.machine_type, "acceleratorType": o.accelerator_type,
             "acceleratorCount": gpus}
  return {"machineSpec": machine, "replicaCount": replicas, **_code_spec(o, mode, args)}


def _pools(o: Options, kind: str, mode: str) -> list:
  args = _trainer_argv(o, kind)
  if kind == "multi_gpu":
    return [_pool(o, mode, 1, o.gpus_per_machine, args)]
  if kind == "multi_worker":
    # Pool 0 is the chief (exactly one replica); pool 1 holds the other workers.
    return [_pool(o, mode, 1, o.gpus_per_worker, args),
            _pool(o, mode, o.workers - 1, o.gpus_per_worker, args)]
  return [_pool(o, mode, 1, 1, args)]


def _scheduling(o: Options) -> dict:
  # Restarting every worker when one restarts lets MultiWorkerMirroredStrategy rebuild its
  # collective group and resume from the last checkpoint after a preemption.
  scheduling = {"timeout": f"{o.timeout_s}s",
                "restartJobOnWorkerRestart": o.restart_job_on_worker_restart}
  if o.spot:
    scheduling["strategy"] = "SPOT"
  return scheduling


def _job_spec(o: Options, kind: str, mode: str) -> dict:
  spec = {"workerPoolSpecs": _pools(o, kind, mode),
          "scheduling": _scheduling(o),
          "baseOutputDirectory": {"outputUriPrefix": f"{o.output_dir.rstrip('/')}/{kind}"}}
  if o.service_account:
    spec["serviceAccount"] = o.service_account
  if o.network:
    spec["network"] = o.network
  return spec


def _labels(kind: str, mode: str) -> dict:
  return {"app": "mnist-dist-trainer", "job-kind": kind.replace("_", "-"), "mode": mode}


def custom_job(o: Options, kind: str, mode: str) -> dict:
  """The CustomJob request body (REST JSON field names) for one_gpu, multi_gpu or multi_worker."""
  if kind not in STRATEGY_OF or kind == "hp_tuning":
    raise SpecError(f"Unknown custom job kind {kind!r}.")
  _check_batch(o, kind)
  return {"displayName": f"{o.display_name}-{kind.replace('_', '-')}",
          "labels": _labels(kind, mode), "jobSpec": _job_spec(o, kind, mode)}


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
    raise SpecError("Nothing to render: give --staging_bucket (python-package mode) and/or "
                    "--image_uri (custom-container mode).")
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
  os.makedirs(out_dir, exist_ok=True)
  paths = []
  for mode in modes:
    for kind in JOB_KINDS:
      body = build(o, kind, mode)
      check_against_api(body, kind)
      path = os.path.join(out_dir, file_name(kind, mode))
      with open(path, "w") as f:
        f.write(json.dumps(body, indent=2) + "\n")
      paths.append(path)
  return paths


def _upload_sdist(o: Options, project: str) -> None:
  local = REPO_ROOT / "dist" / sdist_name()
  if not local.exists():
    raise SpecError(f"{local} is missing: run `make package` first.")
  from google.cloud import storage
  bucket, _, blob = package_uri(o)[len("gs://"):].partition("/")
  storage.Client(project=project).bucket(bucket).blob(blob).upload_from_filename(str(local))
  logging.info("Uploaded %s to %s", local, package_uri(o))


def submit(o: Options, kind: str, mode: str, project: str, region: str) -> str:
  """Creates the job on Vertex AI and returns its resource name (thin: needs a real project)."""
  from google.cloud import aiplatform_v1
  body = build(o, kind, mode)
  check_against_api(body, kind)
  if mode == "package" and not o.package_uri:
    _upload_sdist(o, project)
  client = aiplatform_v1.JobServiceClient(
      client_options={"api_endpoint": f"{region}-aiplatform.googleapis.com"})
  parent = f"projects/{project}/locations/{region}"
  message = api_type(kind).from_json(json.dumps(body))
  if kind == "hp_tuning":
    return client.create_hyperparameter_tuning_job(
        parent=parent, hyperparameter_tuning_job=message).name
  return client.create_custom_job(parent=parent, custom_job=message).name


# ---- Command line ----

FLAGS = flags.FLAGS


def _define_flags() -> None:
  """Defined only when run as a program, so tests can import this module next to others."""
  defaults = Options(output_dir="gs://unused")
  flags.DEFINE_enum("job", "one_gpu", JOB_KINDS, "submit: which job to create.")
  flags.DEFINE_boolean("dry_run", False, "submit: print the request body JSON, create nothing.")
  flags.DEFINE_string("out", None, "render: directory for the JSON files.")
  flags.DEFINE_string("project", None, "submit: Google Cloud project ID.")
  flags.DEFINE_string("region", "us-central1", "submit: Vertex AI region.")
  flags.DEFINE_string("output_dir", None, "gs:// prefix; each job writes under OUTPUT_DIR/<job>.")
  flags.DEFINE_string("staging_bucket", "", "gs:// bucket the sdist is uploaded to (package mode).")
  flags.DEFINE_string("package_uri", "", "gs:// URI of an already uploaded sdist (no upload).")
  flags.DEFINE_string("image_uri", "", "Image built from deploy/Dockerfile: container mode.")
  flags.DEFINE_string("executor_image_uri", defaults.executor_image_uri,
                      "Prebuilt Vertex AI training image for package mode.")
  flags.DEFINE_string("display_name", defaults.display_name, "Prefix of the jobs' display names.")
  flags.DEFINE_string("machine_type", defaults.machine_type, "Compute Engine machine type.")
  flags.DEFINE_string("accelerator_type", defaults.accelerator_type,
                      "Vertex AI AcceleratorType enum name, e.g. NVIDIA_TESLA_T4, NVIDIA_L4.")
  flags.DEFINE_integer("gpus_per_machine", defaults.gpus_per_machine, "GPUs of the multi_gpu job.")
  flags.DEFINE_integer("workers", defaults.workers, "multi_worker: machines, chief included.")
  flags.DEFINE_integer("gpus_per_worker", defaults.gpus_per_worker, "multi_worker: GPUs each.")
  flags.DEFINE_integer("timeout_s", defaults.timeout_s, "Job (or trial) timeout in seconds.")
  flags.DEFINE_boolean("restart_job_on_worker_restart", True,
                       "Restart all workers when one restarts (preemption recovery).")
  flags.DEFINE_boolean("spot", False, "Use Spot VMs (cheaper, preemptible).")
  flags.DEFINE_string("service_account", "", "Service account the job runs as.")
  flags.DEFINE_string("network", "", "VPC (projects/NUM/global/networks/NAME) to peer with.")
  flags.DEFINE_integer("max_trial_count", defaults.max_trial_count, "hp_tuning: trials.")
  flags.DEFINE_integer("parallel_trial_count", defaults.parallel_trial_count,
                       "hp_tuning: trials at once.")
  flags.DEFINE_integer("max_failed_trial_count", defaults.max_failed_trial_count,
                       "hp_tuning: failed trials before the study stops.")
  flags.DEFINE_float("lr_min", defaults.lr_min, "hp_tuning: lowest learning rate.")
  flags.DEFINE_float("lr_max", defaults.lr_max, "hp_tuning: highest learning rate.")
  flags.DEFINE_list("batch_sizes", [str(b) for b in defaults.batch_sizes],
                    "hp_tuning: global batch sizes to try.")


def _options_from_flags(extra_args: Sequence[str]) -> Options:
  names = [f.name for f in dataclasses.fields(Options) if f.name not in ("batch_sizes",
                                                                         "trainer_args")]
  values = {name: FLAGS[name].value for name in names}
  values["output_dir"] = values["output_dir"] or ""
  try:
    values["batch_sizes"] = tuple(int(b) for b in FLAGS.batch_sizes)
  except ValueError:
    raise SpecError(f"--batch_sizes must be integers, got {FLAGS.batch_sizes}.") from None
  return Options(**values, trainer_args=tuple(extra_args))


def _mode(o: Options) -> str:
  return "container" if o.image_uri else "package"


def _run(command: str, extra_args: Sequence[str]) -> int:
  o = _options_from_flags(extra_args)
  if command == "render":
    if not FLAGS.out:
      raise SpecError("render needs --out=DIR.")
    for path in render_all(o, FLAGS.out):
      print(path)
    return 0
  if FLAGS.dry_run:
    body = build(o, FLAGS.job, _mode(o))
    check_against_api(body, FLAGS.job)
    print(json.dumps(body, indent=2))
    return 0
  if not FLAGS.project:
    raise SpecError("submit needs --project (or --dry_run to only print the request).")
  print(submit(o, FLAGS.job, _mode(o), FLAGS.project, FLAGS.region))
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
