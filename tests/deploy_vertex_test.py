"""Vertex AI specs: every rendered request body parses into google-cloud-aiplatform's API types."""

import json
import pathlib
import shlex
import subprocess

import pytest
from absl import flags as absl_flags
from google.protobuf import json_format

from deploy import vertex
import conftest
import forked_cli


class _LazyAiplatform:
  """google.cloud.aiplatform_v1, imported by the first test that uses it: its __init__ imports
  every service client (1.2 s of CPU), which a test process that only collects this module (all
  but one or two under xdist) need not pay."""

  def __getattr__(self, name):
    if name.startswith("_"):  # pytest's collection probes objects for its own attributes
      raise AttributeError(name)
    from google.cloud import aiplatform_v1  # pylint: disable=import-outside-toplevel
    return getattr(aiplatform_v1, name)


aiplatform_v1 = _LazyAiplatform()

ROOT = pathlib.Path(__file__).resolve().parent.parent
OUTPUT_DIR = "gs://out-bucket/runs/r1"
STAGING = "gs://staging-bucket"
IMAGE = "us-docker.pkg.dev/proj/repo/mnist-trainer:1"
EXECUTOR = f"us-docker.pkg.dev/vertex-ai/training/{vertex.NEWEST_PREBUILT_TF}:latest"
TRAINER_ARGS = ["--epochs=3", "--checkpoint_every_steps=200"]
CUSTOM_JOBS = {"custom_job_one_gpu": ("one_device", 1, [1]),
               "custom_job_multi_gpu": ("mirrored", 4, [1]),
               "custom_job_multi_worker": ("multi_worker_mirrored", 1, [1, 3])}
EXPECTED_FILES = sorted(f"{stem}{suffix}.json" for stem in [*CUSTOM_JOBS, "hp_tuning_job"]
                        for suffix in ("", "_container"))


# `python -m deploy.vertex`, each run forked from one process that imported the libraries the
# body check needs (tests/forked_cli.py): 1.1 s of CPU a run saved, 20 s over this module. One
# xdist worker runs the whole module (conftest.py, ONE_WORKER_GROUPS), so one test process
# imports google.cloud.aiplatform_v1 and one fork server serves the runs.
VERTEX = forked_cli.ForkServer("deploy.vertex", preload=(
    "absl.app", "google.cloud.aiplatform_v1", "google.protobuf.json_format"),
    PYTHONPATH=str(ROOT))


@pytest.fixture(scope="module", autouse=True)
def _vertex_fork_server():
  yield
  VERTEX.close()


def run_vertex(*args):
  return VERTEX.run(*args, timeout=120)


def dry_run(*args, job="one_gpu"):
  result = run_vertex("submit", "--dry_run", f"--job={job}", f"--output_dir={OUTPUT_DIR}", *args)
  assert result.returncode == 0, result.stderr
  return json.loads(result.stdout), result.stderr


def api_message(body: dict, file_name: str):
  """The validator: strict parse into the official request type (unknown field -> ParseError)."""
  message_type = (aiplatform_v1.HyperparameterTuningJob if file_name.startswith("hp_tuning")
                  else aiplatform_v1.CustomJob)
  return json_format.ParseDict(body, message_type.pb(message_type()),
                               ignore_unknown_fields=False)


def options(**overrides):
  values = dict(output_dir=OUTPUT_DIR, image_uri=IMAGE)
  values.update(overrides)
  return vertex.Options(**values)


@pytest.fixture(scope="module")
def render_result(tmp_path_factory):
  out = tmp_path_factory.mktemp("vertex")
  result = run_vertex("render", f"--out={out}", f"--output_dir={OUTPUT_DIR}",
                      f"--staging_bucket={STAGING}", f"--executor_image_uri={EXECUTOR}",
                      f"--image_uri={IMAGE}", "--workers=4", "--", *TRAINER_ARGS)
  assert result.returncode == 0, result.stderr
  return result, {p.name: json.loads(p.read_text()) for p in out.glob("*.json")}


@pytest.fixture(scope="module")
def rendered(render_result):
  return render_result[1]


def test_render_writes_one_file_per_job_and_mode(rendered):
  assert sorted(rendered) == EXPECTED_FILES


@pytest.mark.parametrize("file_name", EXPECTED_FILES)
def test_every_rendered_body_is_a_valid_api_request(rendered, file_name):
  message = api_message(rendered[file_name], file_name)
  spec = message.trial_job_spec if file_name.startswith("hp_tuning") else message.job_spec
  assert spec.worker_pool_specs, "the parse kept no worker pools"
  for pool in spec.worker_pool_specs:
    assert pool.machine_spec.accelerator_type == aiplatform_v1.AcceleratorType.NVIDIA_TESLA_T4


def test_the_validator_rejects_a_misspelled_field(rendered):
  body = json.loads(json.dumps(rendered["custom_job_multi_worker.json"]))
  scheduling = body["jobSpec"]["scheduling"]
  scheduling["restartJobOnWorkerRestat"] = scheduling.pop("restartJobOnWorkerRestart")
  with pytest.raises(json_format.ParseError, match="restartJobOnWorkerRestat"):
    api_message(body, "custom_job_multi_worker.json")
  body = json.loads(json.dumps(rendered["hp_tuning_job.json"]))
  body["studySpec"]["metrics"][0]["goal"] = "MAXIMISE"
  with pytest.raises(json_format.ParseError, match="MAXIMISE"):
    api_message(body, "hp_tuning_job.json")


def _pools(body):
  spec = body.get("jobSpec") or body["trialJobSpec"]
  return spec["workerPoolSpecs"]


def _code(pool):
  return pool.get("pythonPackageSpec") or pool["containerSpec"]


@pytest.mark.parametrize("stem", sorted(CUSTOM_JOBS))
@pytest.mark.parametrize("suffix", ["", "_container"])
def test_custom_job_shapes(rendered, stem, suffix):
  strategy, gpus, replicas = CUSTOM_JOBS[stem]
  body = rendered[f"{stem}{suffix}.json"]
  pools = _pools(body)
  assert [p["replicaCount"] for p in pools] == replicas
  for pool in pools:
    assert pool["machineSpec"]["acceleratorCount"] == gpus
    args = _code(pool)["args"]
    assert args[:2] == [f"--strategy={strategy}",
                        f"--max_job_restarts={vertex.DEFAULT_MAX_JOB_RESTARTS}"]
    assert args[2:] == TRAINER_ARGS
    # Vertex AI's AIP_MODEL_DIR (from baseOutputDirectory) is the model dir, not a flag.
    assert not any(a.startswith("--model_dir") for a in args)
  spec = body["jobSpec"]
  assert spec["baseOutputDirectory"]["outputUriPrefix"].startswith(OUTPUT_DIR + "/")
  assert spec["scheduling"]["restartJobOnWorkerRestart"] is True
  assert spec["scheduling"]["timeout"].endswith("s")


def test_multi_worker_is_one_chief_plus_workers(rendered):
  chief, workers = _pools(rendered["custom_job_multi_worker_container.json"])
  assert chief["replicaCount"] == 1
  assert workers["replicaCount"] == 3  # --workers=4 in total
  assert chief["machineSpec"] == workers["machineSpec"]
  assert chief["containerSpec"] == workers["containerSpec"]


def test_package_mode_runs_the_uploaded_sdist_on_the_chosen_prebuilt_image(rendered):
  for name in ("custom_job_one_gpu.json", "hp_tuning_job.json"):
    code = _pools(rendered[name])[0]["pythonPackageSpec"]
    assert code["pythonModule"] == "trainer.task"
    assert code["executorImageUri"] == EXECUTOR
    [uri] = code["packageUris"]
    assert uri == f"{STAGING}/packages/{vertex.sdist_name()}"
    assert uri.endswith(".tar.gz")


def test_package_mode_needs_an_explicit_executor_image():
  result = run_vertex("submit", "--dry_run", f"--output_dir={OUTPUT_DIR}",
                      f"--staging_bucket={STAGING}")
  assert result.returncode == 2
  assert "--executor_image_uri" in result.stderr and "--image_uri" in result.stderr
  assert vertex.tensorflow_pin() in result.stderr
  assert result.stdout == ""


def test_package_mode_warns_that_the_sdist_replaces_tensorflow(render_result):
  result, _ = render_result
  assert "warning" in result.stderr and "TensorFlow 2.17" in result.stderr
  assert vertex.tensorflow_pin() in result.stderr
  # A container-only render installs nothing over the image: no warning.
  container_only = run_vertex("submit", "--dry_run", f"--output_dir={OUTPUT_DIR}",
                              f"--image_uri={IMAGE}")
  assert "warning" not in container_only.stderr


def test_container_mode_runs_the_image(rendered):
  for name in ("custom_job_one_gpu_container.json", "hp_tuning_job_container.json"):
    pool = _pools(rendered[name])[0]
    assert "pythonPackageSpec" not in pool
    assert pool["containerSpec"]["imageUri"] == IMAGE


def test_hp_tuning_maximizes_test_accuracy_over_lr_and_batch(rendered):
  for name in ("hp_tuning_job.json", "hp_tuning_job_container.json"):
    body = rendered[name]
    assert body["studySpec"]["metrics"] == [{"metricId": "test_accuracy", "goal": "MAXIMIZE"}]
    params = {p["parameterId"]: p for p in body["studySpec"]["parameters"]}
    assert sorted(params) == ["global_batch_size", "learning_rate"]
    lr = params["learning_rate"]["doubleValueSpec"]
    assert 0 < lr["minValue"] < lr["maxValue"]
    # Trial args carry the values as given: they must parse as the trainer's integer flag.
    batches = params["global_batch_size"]["categoricalValueSpec"]["values"]
    assert batches and all(b.isdigit() and int(b) > 0 for b in batches)
    assert 0 < body["parallelTrialCount"] <= body["maxTrialCount"]
    [pool] = _pools(body)
    assert pool["replicaCount"] == 1
    assert _code(pool)["args"][0] == "--strategy=one_device"
    # Trials write to AIP_MODEL_DIR=<prefix>/<trial id>/model, so they never share checkpoints.
    assert body["trialJobSpec"]["baseOutputDirectory"]["outputUriPrefix"].startswith(OUTPUT_DIR)


def test_submit_dry_run_prints_the_request_body():
  body, _ = dry_run("--workers=4", "--gpus_per_worker=2", "--accelerator_type=NVIDIA_L4",
                    "--machine_type=g2-standard-24", "--spot", f"--image_uri={IMAGE}",
                    "--", "--epochs=1", job="multi_worker")
  message = api_message(body, "custom_job_multi_worker.json")
  assert message.job_spec.scheduling.strategy == aiplatform_v1.Scheduling.Strategy.SPOT
  assert [p["replicaCount"] for p in _pools(body)] == [1, 3]
  assert {p["machineSpec"]["acceleratorCount"] for p in _pools(body)} == {2}
  assert _code(_pools(body)[0])["args"] == ["--strategy=multi_worker_mirrored",
                                            "--max_job_restarts=5", "--epochs=1"]
  # The printed body is what the library builds in-process: one source of truth.
  o = options(workers=4, gpus_per_worker=2, accelerator_type="NVIDIA_L4",
              machine_type="g2-standard-24", spot=True, trainer_args=("--epochs=1",))
  assert body == vertex.build(o, "multi_worker", "container")


# ---- Machine types and accelerators (Vertex AI "configure compute") ----

@pytest.mark.parametrize("machine, accelerator, gpus", [
    ("n1-standard-8", "", 4),
    ("n1-highmem-16", "NVIDIA_TESLA_V100", 8),
    ("n1-standard-4", "NVIDIA_TESLA_P4", 2),
    ("g2-standard-48", "", 4),
    ("g2-standard-48", "NVIDIA_L4", 4),
    ("a2-ultragpu-2g", "", 2),
    ("a2-highgpu-8g", "", 8),
    ("a3-highgpu-8g", "", 8),
    # The A3 High sizes below 8 GPUs (refused before as "takes no GPUs"), A3 Mega/Ultra, A4.
    ("a3-highgpu-1g", "", 1),
    ("a3-highgpu-2g", "NVIDIA_H100_80GB", 2),
    ("a3-highgpu-4g", "", 4),
    ("a3-megagpu-8g", "", 8),
    ("a3-ultragpu-8g", "", 8),
    ("a4-highgpu-8g", "NVIDIA_B200", 8),
    ("g2-standard-24", "", 2),
    # N1 at the vCPU caps of Compute Engine's N1 + GPU tables.
    ("n1-highmem-8", "NVIDIA_TESLA_V100", 1),
    ("n1-standard-32", "NVIDIA_TESLA_T4", 1),
    ("n1-standard-96", "NVIDIA_TESLA_T4", 4),
    ("n1-highcpu-16", "NVIDIA_TESLA_P100", 1),
    ("n1-standard-16", "NVIDIA_TESLA_P4", 1),
    ("n1-standard-96", "NVIDIA_TESLA_V100", 8),
])
def test_valid_machine_and_gpu_combinations_render(machine, accelerator, gpus):
  body = vertex.build(options(machine_type=machine, accelerator_type=accelerator,
                              gpus_per_machine=gpus, trainer_args=("--global_batch_size=256",)),
                      "multi_gpu", "container")
  spec = api_message(body, "custom_job").job_spec.worker_pool_specs[0].machine_spec
  assert spec.machine_type == machine
  assert spec.accelerator_count == gpus
  expected = accelerator or (vertex.FIXED_GPU_MACHINES.get(machine, ("NVIDIA_TESLA_T4",))[0])
  assert spec.accelerator_type == aiplatform_v1.AcceleratorType[expected]


def test_one_h100_on_a3_highgpu_1g_is_a_one_gpu_job():
  """The issue's case: a3-highgpu-1g used to exit 2 with "takes no GPUs"."""
  body, _ = dry_run("--machine_type=a3-highgpu-1g", f"--image_uri={IMAGE}", job="one_gpu")
  spec = api_message(body, "custom_job").job_spec.worker_pool_specs[0].machine_spec
  assert (spec.machine_type, spec.accelerator_count) == ("a3-highgpu-1g", 1)
  assert spec.accelerator_type == aiplatform_v1.AcceleratorType.NVIDIA_H100_80GB


SUPPORTED_FIXED = sorted(set(vertex.FIXED_GPU_MACHINES) - set(vertex.UNSUPPORTED_MACHINES))


@pytest.mark.parametrize("machine", SUPPORTED_FIXED)
def test_every_table_entry_is_a_real_accelerator_type(machine):
  accelerator, count = vertex.FIXED_GPU_MACHINES[machine]
  assert accelerator in aiplatform_v1.AcceleratorType.__members__
  body = vertex.build(options(machine_type=machine, gpus_per_machine=count,
                              trainer_args=(f"--global_batch_size={count * 32}",)),
                      "multi_gpu", "container")
  assert api_message(body, "custom_job").job_spec.worker_pool_specs[0].machine_spec \
      .accelerator_count == count


@pytest.mark.parametrize("args, messages", [
    (["--job=multi_gpu", "--machine_type=g2-standard-8", "--gpus_per_machine=4"],
     ["g2-standard-8 has exactly 1 NVIDIA_L4", "4 (g2-standard-48)", "2 (g2-standard-24)"]),
    (["--job=multi_gpu", "--machine_type=a3-highgpu-8g", "--gpus_per_machine=1"],
     ["a3-highgpu-8g has exactly 8 NVIDIA_H100_80GB", "--gpus_per_machine asks for 1"]),
    (["--job=one_gpu", "--machine_type=a3-highgpu-8g"], ["the one_gpu job asks for 1"]),
    (["--job=one_gpu", "--accelerator_type=NVIDIA_L4"],
     ["NVIDIA_L4 does not attach to --machine_type=n1-standard-8", "g2-standard-4"]),
    (["--job=multi_gpu", "--gpus_per_machine=3"], ["valid counts: 1, 2, 4"]),
    (["--job=multi_gpu", "--accelerator_type=NVIDIA_TESLA_V100", "--gpus_per_machine=16"],
     ["valid counts: 1, 2, 4, 8"]),
    (["--job=one_gpu", "--machine_type=a2-highgpu-1g", "--accelerator_type=NVIDIA_L4"],
     ["comes with NVIDIA_TESLA_A100"]),
    (["--job=one_gpu", "--machine_type=n2-standard-8"], ["n2-standard-8 takes no GPUs"]),
    (["--job=multi_gpu", "--machine_type=g2-standard-8", "--gpus_per_machine=0"],
     ["always has GPUs"]),
    (["--job=multi_worker", "--gpus_per_worker=0", "--accelerator_type=NVIDIA_TESLA_T4"],
     ["CPU-only job: drop --accelerator_type"]),
])
def test_specs_vertex_ai_would_refuse_exit_2_with_the_valid_choices(args, messages):
  result = run_vertex("submit", "--dry_run", f"--output_dir={OUTPUT_DIR}", f"--image_uri={IMAGE}",
                      *args)
  assert result.returncode == 2, result.stdout
  for message in messages:
    assert message in result.stderr, result.stderr
  assert result.stdout == ""


@pytest.mark.parametrize("args, messages", [
    # The case: 1 V100 allows at most 12 vCPUs (n1-standard-16 used to pass).
    (["--job=one_gpu", "--machine_type=n1-standard-16", "--accelerator_type=NVIDIA_TESLA_V100"],
     ["--machine_type=n1-standard-16 has 16 vCPUs", "1 x NVIDIA_TESLA_V100", "--accelerator_type",
      "at most 12 vCPUs", "use --machine_type=n1-standard-8."]),
    (["--job=multi_gpu", "--machine_type=n1-highmem-16", "--accelerator_type=NVIDIA_TESLA_V100",
      "--gpus_per_machine=1"],
     ["at most 12 vCPUs", "--machine_type=n1-highmem-8 or --gpus_per_machine=2 (up to 24 vCPUs)"]),
    (["--job=multi_worker", "--machine_type=n1-standard-64", "--gpus_per_worker=1"],
     ["1 x NVIDIA_TESLA_T4", "at most 48 vCPUs", "--machine_type=n1-standard-32 or "
      "--gpus_per_worker=4 (up to 96 vCPUs)"]),
    (["--job=one_gpu", "--machine_type=n1-standard-32", "--accelerator_type=NVIDIA_TESLA_P4"],
     ["at most 24 vCPUs", "n1-standard-16"]),
    (["--job=one_gpu", "--machine_type=n1-highcpu-32", "--accelerator_type=NVIDIA_TESLA_P100"],
     ["at most 16 vCPUs", "n1-highcpu-16"]),
    (["--job=one_gpu", "--accelerator_type=NVIDIA_TESLA_K80"], ["reached end of support"]),
    (["--job=multi_gpu", "--machine_type=a4x-highgpu-4g", "--gpus_per_machine=4"],
     ["a4x-highgpu-4g has Arm", "a4-highgpu-8g"]),
])
def test_n1_machines_too_big_for_their_gpus_exit_2_with_the_fix(args, messages):
  result = run_vertex("submit", "--dry_run", f"--output_dir={OUTPUT_DIR}", f"--image_uri={IMAGE}",
                      *args)
  assert result.returncode == 2, result.stdout
  for message in messages:
    assert message in result.stderr, result.stderr
  assert result.stdout == ""


# Compute Engine's N1 + GPU tables also cap memory (GB) per GPU count; vertex.N1_MAX_VCPUS
# checks vCPUs only because no predefined N1 type within a vCPU cap exceeds these.
N1_MAX_MEMORY_GB = {"NVIDIA_TESLA_T4": {1: 312, 2: 312, 4: 624},
                    "NVIDIA_TESLA_V100": {1: 78, 2: 156, 4: 312, 8: 624},
                    "NVIDIA_TESLA_P100": {1: 104, 2: 208, 4: 624},
                    "NVIDIA_TESLA_P4": {1: 156, 2: 312, 4: 624}}
N1_GB_PER_VCPU = {"standard": 3.75, "highmem": 6.5, "highcpu": 0.9}


def test_n1_vcpu_caps_cover_every_gpu_count_and_memory_never_binds():
  assert set(vertex.N1_MAX_VCPUS) == set(vertex.N1_GPU_COUNTS)
  for accelerator, counts in vertex.N1_GPU_COUNTS.items():
    assert sorted(vertex.N1_MAX_VCPUS[accelerator]) == list(counts)
    for count, cap in vertex.N1_MAX_VCPUS[accelerator].items():
      for family, gb_per_vcpu in N1_GB_PER_VCPU.items():
        for vcpus in (n for n in vertex.N1_SIZES if n <= cap):
          assert vcpus * gb_per_vcpu <= N1_MAX_MEMORY_GB[accelerator][count], (family, vcpus)


def test_cpu_only_jobs_have_no_accelerator():
  body, _ = dry_run("--gpus_per_machine=0", f"--image_uri={IMAGE}", job="multi_gpu")
  [pool] = _pools(body)
  assert pool["machineSpec"] == {"machineType": "n1-standard-8"}
  # One replica per vCPU, given explicitly so the batch check above matches the trainer.
  assert _code(pool)["args"][:3] == ["--strategy=mirrored", "--max_job_restarts=5",
                                     "--num_cpu_devices=8"]
  api_message(body, "custom_job")
  body, _ = dry_run("--gpus_per_worker=0", f"--image_uri={IMAGE}", job="multi_worker")
  assert all(p["machineSpec"] == {"machineType": "n1-standard-8"} for p in _pools(body))
  api_message(body, "custom_job")


def test_cpu_only_batch_check_counts_vcpus():
  with pytest.raises(vertex.SpecError, match="96 replicas"):
    vertex.build(options(machine_type="n1-standard-96", gpus_per_machine=0), "multi_gpu",
                 "container")
  body = vertex.build(options(machine_type="n1-standard-96", gpus_per_machine=0,
                              trainer_args=("--num_cpu_devices=16",)), "multi_gpu", "container")
  assert "--num_cpu_devices=16" in _code(_pools(body)[0])["args"]
  assert not any(a == "--num_cpu_devices=96" for a in _code(_pools(body)[0])["args"])
  assert vertex.machine_vcpus("n2-custom-6-24576") == 6
  assert vertex.machine_vcpus("e2-medium") is None


# ---- Scheduling, TensorBoard, web access ----

def test_flex_start_waits_at_most_max_wait():
  body, _ = dry_run("--flex_start", "--max_wait_s=3600", f"--image_uri={IMAGE}")
  scheduling = api_message(body, "custom_job").job_spec.scheduling
  assert scheduling.strategy == aiplatform_v1.Scheduling.Strategy.FLEX_START
  assert scheduling.max_wait_duration.seconds == 3600
  assert body["jobSpec"]["scheduling"]["maxWaitDuration"] == "3600s"


def test_disable_retries_also_turns_off_whole_job_restarts():
  body, _ = dry_run("--disable_retries", f"--image_uri={IMAGE}", job="multi_worker")
  scheduling = api_message(body, "custom_job").job_spec.scheduling
  assert scheduling.disable_retries is True
  assert scheduling.restart_job_on_worker_restart is False


def test_tensorboard_and_web_access_reach_the_job_spec():
  tensorboard = "projects/p/locations/europe-west4/tensorboards/123"
  body, _ = dry_run("--region=europe-west4", f"--tensorboard={tensorboard}",
                    "--service_account=trainer@p.iam.gserviceaccount.com", "--enable_web_access",
                    "--image_uri=europe-docker.pkg.dev/p/r/mnist-trainer:1", job="hp_tuning")
  spec = api_message(body, "hp_tuning_job").trial_job_spec
  assert spec.tensorboard == tensorboard
  assert spec.enable_web_access is True
  assert spec.service_account == "trainer@p.iam.gserviceaccount.com"


@pytest.mark.parametrize("args, message", [
    (["--max_wait_s=600"], "only honours scheduling.maxWaitDuration with the FLEX_START"),
    (["--spot", "--flex_start"], "pick one"),
    (["--tensorboard=projects/p/locations/us-east1/tensorboards/1",
      "--service_account=sa@p.iam.gserviceaccount.com"], "TensorBoard in us-central1"),
    (["--tensorboard=projects/p/locations/us-central1/tensorboards/1"], "needs --service_account"),
    (["--tensorboard=tensorboards/1"], "projects/PROJECT/locations/REGION/tensorboards/ID"),
    (["--max_job_restarts=-1"], "--max_job_restarts must be >= 0"),
    (["--", "--max_job_restarts=3"], "use this tool's --max_job_restarts"),
    (["--region=US"], "--region='US'"),
])
def test_bad_scheduling_and_tensorboard_flags_exit_2(args, message):
  result = run_vertex("submit", "--dry_run", f"--output_dir={OUTPUT_DIR}", f"--image_uri={IMAGE}",
                      *args)
  assert result.returncode == 2
  assert message in result.stderr, result.stderr


# ---- Image location vs job region ----

@pytest.mark.parametrize("location, region, ok", [
    ("us", "us-central1", True),
    ("europe", "us-central1", False),
    ("us", "europe-west4", False),
    ("europe", "europe-west4", True),
    ("europe-west4", "europe-west4", True),
    ("europe-west1", "europe-west4", False),
    ("asia", "asia-northeast1", True),
    ("us", "australia-southeast1", True),  # no multi-region of its own: any one will do
    ("us-east1", "australia-southeast1", False),
])
def test_image_location_must_serve_the_job_region(location, region, ok):
  assert vertex.region_matches(location, region) is ok


def test_cross_region_images_are_refused_unless_allowed():
  europe_image = "europe-docker.pkg.dev/p/r/mnist-trainer:1"
  result = run_vertex("submit", "--dry_run", f"--output_dir={OUTPUT_DIR}",
                      f"--image_uri={europe_image}")
  assert result.returncode == 2
  assert "stored in europe" in result.stderr and "us-docker.pkg.dev" in result.stderr
  body, _ = dry_run(f"--image_uri={europe_image}", "--allow_cross_region_image")
  assert _pools(body)[0]["containerSpec"]["imageUri"] == europe_image
  result = run_vertex("submit", "--dry_run", f"--output_dir={OUTPUT_DIR}", "--region=europe-west4",
                      f"--staging_bucket={STAGING}", f"--executor_image_uri={EXECUTOR}")
  assert result.returncode == 2
  assert "--executor_image_uri" in result.stderr and "europe-docker.pkg.dev" in result.stderr
  # Registries whose name tells no location (Docker Hub, gcr.io) are not second-guessed.
  dry_run("--image_uri=docker.io/me/mnist-trainer:1", "--region=europe-west4")


# ---- The commands that send a body ----

def test_dry_run_prints_the_commands_that_send_the_body(tmp_path):
  body, stderr = dry_run("--project=my-proj", "--region=europe-west4",
                         "--image_uri=europe-docker.pkg.dev/p/r/mnist-trainer:1", job="multi_gpu")
  commands = [line.strip() for line in stderr.splitlines() if line.startswith("  ")]
  curl, extract, gcloud = commands
  assert curl.startswith("curl ") and "--data @custom_job_multi_gpu_container.json" in curl
  assert ("https://europe-west4-aiplatform.googleapis.com/v1/projects/my-proj/locations/"
          "europe-west4/customJobs") in curl
  assert gcloud.startswith("gcloud ai custom-jobs create --project=my-proj --region=europe-west4")
  assert "--display-name=mnist-dist-multi-gpu" in gcloud
  # Run the extraction step for real: gcloud's --config must be a valid CustomJobSpec.
  (tmp_path / "custom_job_multi_gpu_container.json").write_text(json.dumps(body))
  subprocess.run(["bash", "-c", extract], cwd=tmp_path, check=True, timeout=60)
  config_file = shlex.split(gcloud)[-1].split("=", 1)[1]
  spec = json.loads((tmp_path / config_file).read_text())
  json_format.ParseDict(spec, aiplatform_v1.CustomJobSpec.pb(aiplatform_v1.CustomJobSpec()))
  assert spec == body["jobSpec"]


def test_hp_tuning_is_sent_to_its_own_collection():
  body, stderr = dry_run(f"--image_uri={IMAGE}", job="hp_tuning")
  commands = [line.strip() for line in stderr.splitlines() if line.startswith("  ")]
  [curl] = commands
  assert curl.endswith("/locations/us-central1/hyperparameterTuningJobs")
  assert "--data @hp_tuning_job_container.json" in curl


# ---- Flags and the trainer ----

@pytest.mark.parametrize("args, message", [
    (["submit", "--dry_run", f"--image_uri={IMAGE}"], "--output_dir is required"),
    (["submit", "--dry_run", "--output_dir=/local/dir", f"--image_uri={IMAGE}"], "gs://"),
    (["submit", "--dry_run", f"--output_dir={OUTPUT_DIR}"], "--staging_bucket"),
    (["submit", "--dry_run", f"--output_dir={OUTPUT_DIR}", f"--image_uri={IMAGE}",
      "--accelerator_type=TESLA_T4"], "TESLA_T4"),
    (["submit", "--dry_run", f"--output_dir={OUTPUT_DIR}", f"--image_uri={IMAGE}", "--",
      "--model_dir=gs://x/y"], "AIP_MODEL_DIR"),
    (["submit", "--dry_run", "--job=multi_gpu", "--gpus_per_machine=2",
      f"--output_dir={OUTPUT_DIR}", f"--image_uri={IMAGE}", "--", "--global_batch_size=255"],
     "does not divide"),
    (["submit", "--dry_run", "--job=hp_tuning", f"--output_dir={OUTPUT_DIR}",
      f"--image_uri={IMAGE}", "--", "--learning_rate=0.1"], "sets it per trial"),
    (["submit", f"--output_dir={OUTPUT_DIR}", f"--image_uri={IMAGE}"], "--project"),
    (["render", f"--output_dir={OUTPUT_DIR}", f"--image_uri={IMAGE}"], "--out"),
    (["launch"], "`submit` or `render`"),
    (["submit", "--dry_run", "--job=two_gpu"], "two_gpu"),
])
def test_bad_flags_fail_with_a_clear_message(args, message):
  result = run_vertex(*args)
  assert result.returncode != 0
  assert message in result.stderr, result.stderr
  assert result.stdout == ""


def test_a_bad_option_leaves_no_partial_render(tmp_path):
  out = tmp_path / "specs"
  result = run_vertex("render", f"--out={out}", f"--output_dir={OUTPUT_DIR}",
                      f"--image_uri={IMAGE}", "--machine_type=g2-standard-24")
  assert result.returncode == 2
  assert "the one_gpu job asks for 1" in result.stderr
  assert not out.exists()


def test_options_are_validated_in_process():
  with pytest.raises(vertex.SpecError, match="--workers"):
    vertex.Options(output_dir=OUTPUT_DIR, workers=1)
  with pytest.raises(vertex.SpecError, match="--strategy"):
    vertex.Options(output_dir=OUTPUT_DIR, trainer_args=("--strategy=mirrored",))
  with pytest.raises(vertex.SpecError, match="--lr_max"):
    vertex.Options(output_dir=OUTPUT_DIR, lr_min=0.1, lr_max=0.01)


def test_strategies_are_ones_the_trainer_accepts():
  from trainer import config
  assert set(vertex.STRATEGY_OF.values()) <= set(config.STRATEGIES)


@pytest.mark.parametrize("kind", vertex.JOB_KINDS)
def test_the_trainer_parses_every_rendered_argument_list(kind):
  from trainer import config
  o = options(gpus_per_machine=0, max_job_restarts=3)  # multi_gpu: the CPU-only arguments
  body = vertex.build(o, kind, "container")
  args = _code(_pools(body)[0])["args"]
  if kind == "hp_tuning":  # Vertex AI appends the tuned values to each trial's arguments.
    args = [*args, "--learning_rate=0.01", "--global_batch_size=128"]
  flag_values = absl_flags.FlagValues()
  config.define_flags(flag_values)
  flag_values(["trainer", *args])
  parsed = config.config_from_flags(flag_values, environ={"AIP_MODEL_DIR": f"{OUTPUT_DIR}/m"})
  assert parsed.runtime.max_job_restarts == 3
  assert parsed.runtime.strategy == vertex.STRATEGY_OF[kind]


def test_package_version_comes_from_setup_py():
  assert vertex.sdist_name().startswith("mnist_dist_trainer-")
  assert f'version="{vertex.package_version()}"' in (ROOT / "setup.py").read_text()


# ---- Where a Vertex AI job's outputs land (slow: trains for a few seconds) ----

@pytest.mark.slow
def test_outputs_land_in_the_aip_directories_vertex_ai_sets(tfds_dir, tmp_path):
  """Vertex AI sets AIP_* from baseOutputDirectory (aiplatform_v1 CustomJobSpec); the trainer
  gets no --model_dir. A local directory stands in for the gs:// OUTPUT prefix."""
  output = tmp_path / "OUTPUT"
  env = conftest.child_env(AIP_MODEL_DIR=f"{output}/model/",
                           AIP_CHECKPOINT_DIR=f"{output}/checkpoints/",
                           AIP_TENSORBOARD_LOG_DIR=f"{output}/logs/",
                           TRAINER_CACHE_DIR=str(tmp_path / "cache"))
  body = vertex.build(options(), "one_gpu", "container")
  rendered_args = _code(_pools(body)[0])["args"]
  tiny = [a for a in conftest.tiny_flags("unused", tfds_dir) if not a.startswith("--model_dir")]
  result = conftest.run_module("trainer.task", *rendered_args, *tiny, env=env, timeout=600)
  assert result.returncode == 0, result.stdout[-3000:]
  model, checkpoints, logs = output / "model", output / "checkpoints", output / "logs"
  metrics = json.loads((model / "metrics.json").read_text())
  assert 0 < metrics["test_accuracy"] <= 1
  assert (model / "export" / "saved_model.pb").exists()
  assert list(checkpoints.glob("ckpt-*.index")), sorted(p.name for p in checkpoints.iterdir())
  assert list(logs.rglob("events.out.tfevents.*"))
  # Nothing of it under the model dir: resume reads AIP_CHECKPOINT_DIR, TensorBoard AIP_...LOG_DIR.
  assert not (model / "checkpoints").exists() and not (model / "logs").exists()
  assert not list(model.rglob("ckpt-*")) and not list(model.rglob("events.out.tfevents.*"))


# ---- The side-car evaluator: worker pool 3 ----

def test_evaluator_is_worker_pool_3_of_the_multi_worker_job():
  body = vertex.build(options(evaluator=True, workers=4), "multi_worker", "container")
  chief, workers, servers, evaluator = _pools(body)
  # Pool 2 (parameter servers) is skipped with an empty value, which keeps pool 3 in place.
  assert servers == {}
  assert evaluator["replicaCount"] == 1 and workers["replicaCount"] == 3
  assert evaluator["machineSpec"] == workers["machineSpec"]
  assert evaluator["containerSpec"] == workers["containerSpec"] == chief["containerSpec"]
  message = api_message(body, "custom_job_multi_worker_container.json")
  assert [p.replica_count for p in message.job_spec.worker_pool_specs] == [1, 3, 0, 1]
  plain = vertex.build(options(workers=4), "multi_worker", "container")
  assert len(_pools(plain)) == 2, "no pool 3 without --evaluator"


def test_the_trainer_runs_pool_3_as_the_evaluator():
  """What Vertex AI hands pool 3's replica: CLUSTER_SPEC with task workerpool3, the AIP_* dirs."""
  from trainer.runtime import cluster
  from trainer import config
  from trainer import task
  body = vertex.build(options(evaluator=True), "multi_worker", "container")
  args = _code(_pools(body)[3])["args"]
  flag_values = absl_flags.FlagValues()
  config.define_flags(flag_values)
  flag_values(["trainer", *args])
  environ = {"AIP_MODEL_DIR": f"{OUTPUT_DIR}/multi_worker/model/",
             "AIP_CHECKPOINT_DIR": f"{OUTPUT_DIR}/multi_worker/checkpoints/",
             "CLUSTER_SPEC": json.dumps({
                 "cluster": {"workerpool0": ["cmle-training-workerpool0-0:2222"],
                             "workerpool1": ["cmle-training-workerpool1-0:2222"],
                             "workerpool3": ["cmle-training-workerpool3-0:2222"]},
                 "environment": "cloud", "task": {"type": "workerpool3", "index": 0}})}
  parsed = config.config_from_flags(flag_values, environ=environ)
  info = cluster.parse_cluster(environ)
  assert info.is_evaluator and info.num_workers == 2
  cluster.check_strategy(parsed.runtime.strategy, info, parsed.runtime.num_cpu_devices)
  task.check_evaluator_finds_checkpoints(flag_values, environ)  # AIP_* name the dirs
  assert parsed.outputs.checkpoint_dir == f"{OUTPUT_DIR}/multi_worker/checkpoints/"


def test_evaluator_only_fits_the_multi_worker_job():
  result = run_vertex("submit", "--dry_run", "--job=one_gpu", f"--output_dir={OUTPUT_DIR}",
                      f"--image_uri={IMAGE}", "--evaluator")
  assert result.returncode == 2 and result.stdout == ""
  assert "--evaluator adds worker pool 3 to the multi_worker job, not to one_gpu" in result.stderr
  body, _ = dry_run(f"--image_uri={IMAGE}", "--evaluator", job="multi_worker")
  assert [p.get("replicaCount") for p in _pools(body)] == [1, 1, None, 1]
