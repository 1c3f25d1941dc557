"""Vertex AI specs: every rendered request body parses into google-cloud-aiplatform's API types."""

import json
import os
import pathlib
import subprocess
import sys

import pytest
from google.cloud import aiplatform_v1
from google.protobuf import json_format

from deploy import vertex

ROOT = pathlib.Path(__file__).resolve().parent.parent
OUTPUT_DIR = "gs://out-bucket/runs/r1"
STAGING = "gs://staging-bucket"
IMAGE = "us-docker.pkg.dev/proj/repo/mnist-trainer:1"
TRAINER_ARGS = ["--epochs=3", "--checkpoint_every_steps=200"]
CUSTOM_JOBS = {"custom_job_one_gpu": ("one_device", 1, [1]),
               "custom_job_multi_gpu": ("mirrored", 4, [1]),
               "custom_job_multi_worker": ("multi_worker_mirrored", 1, [1, 3])}
EXPECTED_FILES = sorted(f"{stem}{suffix}.json" for stem in [*CUSTOM_JOBS, "hp_tuning_job"]
                        for suffix in ("", "_container"))


def run_vertex(*args):
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  return subprocess.run([sys.executable, "-m", "deploy.vertex", *args], env=env, cwd=ROOT,
                        capture_output=True, text=True, timeout=120)


def api_message(body: dict, file_name: str):
  """The validator: strict parse into the official request type (unknown field -> ParseError)."""
  message_type = (aiplatform_v1.HyperparameterTuningJob if file_name.startswith("hp_tuning")
                  else aiplatform_v1.CustomJob)
  return json_format.ParseDict(body, message_type.pb(message_type()),
                               ignore_unknown_fields=False)


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
  out = tmp_path_factory.mktemp("vertex")
  result = run_vertex("render", f"--out={out}", f"--output_dir={OUTPUT_DIR}",
                      f"--staging_bucket={STAGING}", f"--image_uri={IMAGE}", "--workers=4",
                      "--", *TRAINER_ARGS)
  assert result.returncode == 0, result.stderr
  return {p.name: json.loads(p.read_text()) for p in out.glob("*.json")}


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
    assert args[0] == f"--strategy={strategy}"
    assert args[1:] == TRAINER_ARGS
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


def test_package_mode_runs_the_uploaded_sdist_on_the_prebuilt_image(rendered):
  for name in ("custom_job_one_gpu.json", "hp_tuning_job.json"):
    code = _pools(rendered[name])[0]["pythonPackageSpec"]
    assert code["pythonModule"] == "trainer.task"
    assert code["executorImageUri"] == vertex.DEFAULT_EXECUTOR_IMAGE
    assert code["executorImageUri"].startswith("us-docker.pkg.dev/vertex-ai/training/tf-gpu.")
    [uri] = code["packageUris"]
    assert uri == f"{STAGING}/packages/{vertex.sdist_name()}"
    assert uri.endswith(".tar.gz")


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
  result = run_vertex("submit", "--dry_run", "--job=multi_worker", "--workers=4",
                      "--gpus_per_worker=2", "--accelerator_type=NVIDIA_L4",
                      "--machine_type=g2-standard-24", "--spot", f"--output_dir={OUTPUT_DIR}",
                      f"--image_uri={IMAGE}", "--", "--epochs=1")
  assert result.returncode == 0, result.stderr
  body = json.loads(result.stdout)
  message = api_message(body, "custom_job_multi_worker.json")
  assert message.job_spec.scheduling.strategy == aiplatform_v1.Scheduling.Strategy.SPOT
  assert [p["replicaCount"] for p in _pools(body)] == [1, 3]
  assert {p["machineSpec"]["acceleratorCount"] for p in _pools(body)} == {2}
  assert _code(_pools(body)[0])["args"] == ["--strategy=multi_worker_mirrored", "--epochs=1"]
  # The printed body is what the library builds in-process: one source of truth.
  options = vertex.Options(output_dir=OUTPUT_DIR, image_uri=IMAGE, workers=4, gpus_per_worker=2,
                           accelerator_type="NVIDIA_L4", machine_type="g2-standard-24", spot=True,
                           trainer_args=("--epochs=1",))
  assert body == vertex.build(options, "multi_worker", "container")


@pytest.mark.parametrize("args, message", [
    (["submit", "--dry_run", f"--image_uri={IMAGE}"], "--output_dir is required"),
    (["submit", "--dry_run", "--output_dir=/local/dir", f"--image_uri={IMAGE}"], "gs://"),
    (["submit", "--dry_run", f"--output_dir={OUTPUT_DIR}"], "--staging_bucket"),
    (["submit", "--dry_run", f"--output_dir={OUTPUT_DIR}", f"--image_uri={IMAGE}",
      "--accelerator_type=TESLA_T4"], "TESLA_T4"),
    (["submit", "--dry_run", f"--output_dir={OUTPUT_DIR}", f"--image_uri={IMAGE}", "--",
      "--model_dir=gs://x/y"], "AIP_MODEL_DIR"),
    (["submit", "--dry_run", "--job=multi_gpu", "--gpus_per_machine=3",
      f"--output_dir={OUTPUT_DIR}", f"--image_uri={IMAGE}"], "does not divide"),
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


def test_package_version_comes_from_setup_py():
  assert vertex.sdist_name().startswith("mnist_dist_trainer-")
  assert f'version="{vertex.package_version()}"' in (ROOT / "setup.py").read_text()
