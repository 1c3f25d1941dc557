"""gs:// end to end against a real GCS emulator process: train, resume, cluster, predict, faults."""

import json
import os
import re

import pytest

from conftest import child_env, run_module, tiny_flags
from gcs_emulator import FaultProxy
from trainer import errors

pytestmark = pytest.mark.slow
BUCKET = "runs"
EMULATOR_BUCKETS = (BUCKET,)  # for conftest's emulator


def _env(emu_or_proxy, tmp_path, cache="cache", **extra):
  return child_env(**emu_or_proxy.env(), TRAINER_CACHE_DIR=tmp_path / cache,
                   TRAINER_STORAGE_RETRY_DEADLINE_S=60, **extra)


def _complete_markers(emu, prefix):
  """Every _COMPLETE marker under prefix, checked against the objects that really exist."""
  names = set(emu.object_names(BUCKET, prefix))
  markers = [n for n in names if n.endswith("/_COMPLETE")]
  for marker in markers:
    folder = marker[:-len("_COMPLETE")]
    manifest = json.loads(_read(emu, marker))
    for entry in manifest["files"]:
      meta = emu.object(BUCKET, folder + entry["path"])
      assert meta is not None and int(meta["size"]) == entry["size"], (marker, entry)
  return markers


def _read(emu, name):
  import urllib.parse
  import urllib.request
  url = f"{emu.host}/download/storage/v1/b/{BUCKET}/o/{urllib.parse.quote(name, safe='')}?alt=media"
  with urllib.request.urlopen(url) as r:
    return r.read().decode()


def test_train_resume_and_predict_in_bucket(emulator, tmp_path, tfds_dir):
  uri = f"gs://{BUCKET}/run1"
  args = tiny_flags(uri, tfds_dir, train_steps=20, checkpoint_every_steps=10)
  first = run_module("trainer.task", *args, env=_env(emulator, tmp_path, "cache1"))
  assert first.returncode == 0, first.stdout[-4000:]
  names = set(emulator.object_names(BUCKET, "run1/"))
  assert "run1/metrics.json" in names and "run1/export/saved_model.pb" in names
  assert any(n.startswith("run1/logs/train/events.") for n in names)
  markers = sorted(_complete_markers(emulator, "run1/"))
  assert markers == ["run1/checkpoints/ckpt-10/_COMPLETE", "run1/checkpoints/ckpt-20/_COMPLETE",
                     "run1/export/_COMPLETE"]
  assert not os.path.exists("run1") and "gs:" not in os.listdir(os.getcwd())

  # A fresh machine: empty local cache, the bucket is all there is.
  second = run_module("trainer.task", *tiny_flags(uri, tfds_dir, train_steps=30,
                                                  checkpoint_every_steps=10),
                      env=_env(emulator, tmp_path, "cache2"))
  assert second.returncode == 0, second.stdout[-4000:]
  metrics = json.loads(_read(emulator, "run1/metrics.json"))
  assert metrics["start_step"] == 20 and metrics["global_step"] == 30

  predicted = run_module("trainer.predict", f"--model_dir={uri}", "--samples=3",
                         env=_env(emulator, tmp_path, "cache3"), cwd=str(tmp_path))
  assert predicted.returncode == 0, predicted.stdout[-3000:]
  assert predicted.stdout.count("\tclass ") == 3


def test_half_uploaded_checkpoint_is_ignored(emulator, tmp_path, tfds_dir):
  import urllib.parse
  import urllib.request
  uri = f"gs://{BUCKET}/run2"
  args = tiny_flags(uri, tfds_dir, train_steps=20, checkpoint_every_steps=10, export=False)
  assert run_module("trainer.task", *args, env=_env(emulator, tmp_path, "c1")).returncode == 0
  marker = urllib.parse.quote("run2/checkpoints/ckpt-20/_COMPLETE", safe="")
  urllib.request.urlopen(urllib.request.Request(
      f"{emulator.host}/storage/v1/b/{BUCKET}/o/{marker}", method="DELETE")).read()
  rerun = run_module("trainer.task", *tiny_flags(uri, tfds_dir, train_steps=30, export=False,
                                                 checkpoint_every_steps=10),
                     env=_env(emulator, tmp_path, "c2"))
  assert rerun.returncode == 0, rerun.stdout[-3000:]
  assert "upload never completed" in rerun.stdout
  assert json.loads(_read(emulator, "run2/metrics.json"))["start_step"] == 10


def test_two_workers_write_to_bucket(emulator, tmp_path, tfds_dir):
  uri = f"gs://{BUCKET}/cluster"
  result = run_module("trainer.launcher", "--workers=2", "--",
                      *tiny_flags(uri, tfds_dir, collective_timeout_s=120),
                      env=_env(emulator, tmp_path), timeout=400)
  assert result.returncode == 0, result.stdout[-4000:]
  metrics = json.loads(_read(emulator, "cluster/metrics.json"))
  assert metrics["num_workers"] == 2 and metrics["global_step"] == 20
  assert "cluster/export/_COMPLETE" in _complete_markers(emulator, "cluster/")


def test_run_survives_flaky_storage(emulator, tmp_path, tfds_dir):
  uri = f"gs://{BUCKET}/flaky"
  with FaultProxy(emulator.host, fail_rate=0.2, seed=3) as proxy:
    result = run_module("trainer.task", *tiny_flags(uri, tfds_dir, checkpoint_every_steps=5),
                        env=_env(proxy, tmp_path))
    failed = proxy.failed
  assert result.returncode == 0, result.stdout[-4000:]
  assert failed > 0, "the proxy really failed requests"
  markers = _complete_markers(emulator, "flaky/")  # every marker matches what was uploaded
  assert "flaky/export/_COMPLETE" in markers
  assert json.loads(_read(emulator, "flaky/metrics.json"))["global_step"] == 20


def test_missing_bucket_fails_fast(emulator, tmp_path, tfds_dir):
  result = run_module("trainer.task", *tiny_flags("gs://no-such-bucket/run", tfds_dir),
                      env=_env(emulator, tmp_path))
  assert result.returncode == errors.EXIT_STORAGE, result.stdout[-3000:]
  assert "gs://no-such-bucket does not exist" in result.stdout
  assert "Training steps" not in result.stdout


def test_forbidden_bucket_fails_fast(emulator, tmp_path, tfds_dir):
  emulator.create_bucket("locked")
  with FaultProxy(emulator.host, forbid_bucket="locked") as proxy:
    result = run_module("trainer.task", *tiny_flags("gs://locked/run", tfds_dir),
                        env=_env(proxy, tmp_path))
  assert result.returncode == errors.EXIT_STORAGE, result.stdout[-3000:]
  assert "gs://locked" in result.stdout and "roles/storage.objectAdmin" in result.stdout
  assert "Training steps" not in result.stdout


def test_vertex_environment_and_hypertune(emulator, tmp_path, tfds_dir):
  metric_file = tmp_path / "hypertune" / "output.metrics"
  env = _env(emulator, tmp_path, AIP_MODEL_DIR=f"gs://{BUCKET}/vertex/model",
             AIP_CHECKPOINT_DIR=f"gs://{BUCKET}/vertex/ckpt",
             AIP_TENSORBOARD_LOG_DIR=f"gs://{BUCKET}/vertex/tb", CLOUD_ML_TRIAL_ID="7",
             CLOUD_ML_HP_METRIC_FILE=metric_file)
  args = [a for a in tiny_flags("x", tfds_dir) if not a.startswith("--model_dir")]
  result = run_module("trainer.task", *args, env=env)
  assert result.returncode == 0, result.stdout[-4000:]
  names = set(emulator.object_names(BUCKET, "vertex/"))
  assert "vertex/model/trial_7/metrics.json" in names
  assert "vertex/model/trial_7/export/_COMPLETE" in names
  assert "vertex/ckpt/trial_7/ckpt-20/_COMPLETE" in names
  assert any(n.startswith("vertex/tb/trial_7/train/events.") for n in names)
  reported = [json.loads(line) for line in metric_file.read_text().splitlines()]
  metrics = json.loads(_read(emulator, "vertex/model/trial_7/metrics.json"))
  # cloudml-hypertune writes values as strings.
  assert float(reported[-1]["test_accuracy"]) == pytest.approx(metrics["test_accuracy"])
  assert int(reported[-1]["global_step"]) == 20 and str(reported[-1]["trial"]) == "7"


def test_data_staged_from_bucket(emulator, tmp_path):
  from trainer import data
  import urllib.parse
  import urllib.request
  for name in data.MNIST_SHA256:
    with open(os.path.join(data.vendored_mnist_dir(), name), "rb") as f:
      body = f.read()
    url = (f"{emulator.host}/upload/storage/v1/b/{BUCKET}/o?uploadType=media&name="
           f"{urllib.parse.quote('mnist-raw/' + name, safe='')}")
    urllib.request.urlopen(urllib.request.Request(url, data=body, method="POST")).read()
  result = run_module("trainer.task", *tiny_flags(str(tmp_path / "run"), str(tmp_path / "tfds")),
                      f"--mnist_source_dir=gs://{BUCKET}/mnist-raw", "--export=false",
                      env=_env(emulator, tmp_path))
  assert result.returncode == 0, result.stdout[-4000:]
  assert re.search(r"Staged gs://runs/mnist-raw", result.stdout)


def test_deterministic_run_gives_the_same_weights_locally_and_in_a_flaky_bucket(
    emulator, tmp_path, tfds_dir):
  """Storage retries and a GCS client's own draws must not change a seeded run's weights."""
  flags = dict(deterministic=True, checkpoint_every_steps=5, export=False)
  local = run_module("trainer.task", *tiny_flags(str(tmp_path / "local"), tfds_dir, **flags))
  assert local.returncode == 0, local.stdout[-3000:]
  with FaultProxy(emulator.host, fail_rate=0.25, seed=11) as proxy:
    remote = run_module("trainer.task", *tiny_flags(f"gs://{BUCKET}/same", tfds_dir, **flags),
                        env=_env(proxy, tmp_path))
    failed = proxy.failed
  assert remote.returncode == 0, remote.stdout[-3000:]
  assert failed > 0, "the proxy really failed requests"
  local_sha = json.loads((tmp_path / "local" / "metrics.json").read_text())["weights_sha256"]
  assert json.loads(_read(emulator, "same/metrics.json"))["weights_sha256"] == local_sha


def test_missing_bucket_names_the_checkpoint_dir_flag(emulator, tmp_path, tfds_dir):
  result = run_module("trainer.task", *tiny_flags(str(tmp_path / "run"), tfds_dir,
                                                  checkpoint_dir="gs://no-such-bucket/ckpt"),
                      env=_env(emulator, tmp_path))
  assert result.returncode == errors.EXIT_STORAGE, result.stdout[-3000:]
  assert "or fix --checkpoint_dir" in result.stdout and "fix --model_dir" not in result.stdout


def test_missing_bucket_names_the_data_dir_flag(emulator, tmp_path):
  result = run_module("trainer.task", "--model_dir", str(tmp_path / "run"), "--train_steps=1",
                      "--data_dir=gs://no-such-bucket/tfds", env=_env(emulator, tmp_path))
  assert result.returncode == errors.EXIT_STORAGE, result.stdout[-3000:]
  assert "or fix --data_dir" in result.stdout and "fix --model_dir" not in result.stdout
