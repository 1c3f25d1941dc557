"""The side-car evaluator on real checkpoints: local and gs://, the final marker, timeouts."""

import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, child_env, run_module, run_without_tf, tiny_flags
from trainer import config as config_lib
from trainer import errors
from trainer import outputs

EVALUATOR_TF_CONFIG = json.dumps({"task": {"type": "evaluator", "index": 0}})


# ---- Flags and the final marker (no TensorFlow) ----

@pytest.mark.parametrize("value, message", [
    (0.0, "--evaluator_timeout_s must be > 0, got 0.0: give the seconds the evaluator waits"),
    (-5.0, "--evaluator_timeout_s must be > 0, got -5.0"),
    (math.inf, "--evaluator_timeout_s must be a finite number, got inf"),
    (math.nan, "--evaluator_timeout_s must be a finite number, got nan"),
    (1e9, "--evaluator_timeout_s must be at most 604800 (a week)"),
])
def test_evaluator_timeout_must_be_a_positive_finite_wait(value, message):
  with pytest.raises(errors.ConfigError, match=re.escape(message)):
    config_lib.Config(train_steps=10, evaluator_timeout_s=value)


def test_a_bad_evaluator_timeout_exits_2_before_tensorflow_loads(tmp_path):
  result = run_without_tf("trainer.task", *tiny_flags(str(tmp_path / "run"), str(tmp_path)),
                          "--evaluator_timeout_s=0", TF_CONFIG=EVALUATOR_TF_CONFIG)
  assert result.returncode == errors.EXIT_CONFIG, result.stdout[-2000:]
  assert "FATAL ConfigError: --evaluator_timeout_s must be > 0, got 0.0" in result.stdout


def test_the_final_marker_belongs_to_the_step_budget_that_wrote_it(tmp_path):
  config = config_lib.Config(model_dir=str(tmp_path / "run"), train_steps=20)
  paths = outputs.resolve(config.outputs, "evaluator:0", {})
  assert outputs.final_step(paths, config.training) is None
  outputs.write_final_step(paths, 20, config.training)
  assert outputs.final_step(paths, config.training) == 20
  # A run that goes on to 40 steps must not take the 20-step run's marker for its own.
  assert outputs.final_step(paths, config.replace(train_steps=40).training) is None
  assert outputs.final_step(paths, config.replace(train_steps=None, epochs=1).training) is None
  (tmp_path / "run" / "checkpoints" / outputs.FINAL_MARKER).write_text("{not json")
  assert outputs.final_step(paths, config.training) is None
  outputs.remove_final_step(paths)
  outputs.remove_final_step(paths)  # a missing marker is fine
  assert not (tmp_path / "run" / "checkpoints" / outputs.FINAL_MARKER).exists()


# ---- The evaluator process on real checkpoints (slow: TensorFlow starts in a subprocess) ----

def _start_evaluator(args, log_path, env=None):
  env = dict(env or child_env(), TF_CONFIG=EVALUATOR_TF_CONFIG)
  log = open(log_path, "w")
  proc = subprocess.Popen([sys.executable, "-m", "trainer.task", *args], env=env, cwd=ROOT,
                          stdout=log, stderr=subprocess.STDOUT)
  return proc, log


def _finish(proc, log, timeout=240):
  try:
    code = proc.wait(timeout=timeout)
  except subprocess.TimeoutExpired:
    proc.kill()
    pytest.fail(f"the evaluator still runs after {timeout}s")
  finally:
    log.close()
  return code


def _wait_for(path, predicate, timeout, proc):
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if path.exists() and predicate(path.read_text()):
      return
    assert proc.poll() is None, f"the evaluator exited early ({proc.returncode})"
    time.sleep(0.3)
  pytest.fail(f"{path} never reached the expected state")


def _history(model_dir):
  return json.loads((model_dir / "eval_metrics.json").read_text())["history"]


def _train(tfds_dir, model_dir, **flags):
  result = run_module("trainer.task", *tiny_flags(str(model_dir), tfds_dir, **flags))
  assert result.returncode == 0, result.stdout[-3000:]
  return json.loads((model_dir / "metrics.json").read_text())


def _event_steps(log_dir, tag):
  """{step: value} of a scalar in TensorBoard event files under log_dir."""
  import tensorflow as tf
  found = {}
  for path in log_dir.glob("events.out.tfevents.*"):
    for event in tf.compat.v1.train.summary_iterator(str(path)):
      for value in event.summary.value:
        if value.tag == tag:
          found[event.step] = float(tf.make_ndarray(value.tensor))
  return found


@pytest.mark.slow
def test_evaluator_follows_a_run_across_a_restart_to_its_final_checkpoint(tmp_path, tfds_dir):
  model_dir = tmp_path / "run"
  # A first run of 20 steps finishes and leaves its final marker (step 20, --train_steps=20).
  _train(tfds_dir, model_dir, train_steps=20)
  assert json.loads((model_dir / "checkpoints" / "final.json").read_text())["step"] == 20
  # The evaluator belongs to a 40-step run: the 20-step marker is not its end.
  args = tiny_flags(str(model_dir), tfds_dir, train_steps=40, evaluator_timeout_s=120)
  proc, log = _start_evaluator(args, tmp_path / "eval.log")
  _wait_for(model_dir / "eval_metrics.json", lambda t: '"step": 20' in t, 180, proc)
  time.sleep(2)  # polls that find nothing new must not end it: training has not finished
  assert proc.poll() is None, (tmp_path / "eval.log").read_text()[-3000:]
  metrics = _train(tfds_dir, model_dir, train_steps=40)  # resumes at 20, checkpoints 30 and 40
  assert metrics["start_step"] == 20 and metrics["global_step"] == 40
  code = _finish(proc, log)
  out = (tmp_path / "eval.log").read_text()
  assert code == 0, out[-3000:]
  history = _history(model_dir)
  steps = [e["step"] for e in history]
  assert steps[0] == 20 and steps[-1] == 40 and steps == sorted(set(steps)), steps
  # The same weights and the same EvalModel as the chief's final evaluation.
  assert history[-1]["test_accuracy"] == pytest.approx(metrics["test_accuracy"], abs=1e-9)
  assert history[-1]["test_loss"] == pytest.approx(metrics["test_loss"], rel=1e-5)
  assert "Evaluated the final checkpoint (step 40)" in out
  events = _event_steps(model_dir / "logs" / "eval", "test_accuracy")
  assert sorted(events) == steps
  assert events[40] == pytest.approx(metrics["test_accuracy"], abs=1e-6)


@pytest.mark.slow
def test_evaluator_takes_the_newest_good_checkpoint_and_gives_up_with_143(tmp_path, tfds_dir):
  model_dir = tmp_path / "run"
  _train(tfds_dir, model_dir, train_steps=30, export=False)
  ckpts = model_dir / "checkpoints"
  data_file = ckpts / "ckpt-30.data-00000-of-00001"
  with open(data_file, "r+b") as f:  # flip bytes in the middle of the final checkpoint
    f.seek(os.path.getsize(data_file) // 2)
    chunk = f.read(64)
    f.seek(-len(chunk), os.SEEK_CUR)
    f.write(bytes(b ^ 0xFF for b in chunk))
  (ckpts / "ckpt-35.data-00000-of-00001").write_bytes(b"torn")  # no index: never complete
  args = tiny_flags(str(model_dir), tfds_dir, train_steps=30, evaluator_timeout_s=4)
  proc, log = _start_evaluator(args, tmp_path / "eval.log")
  code = _finish(proc, log)
  out = (tmp_path / "eval.log").read_text()
  assert code == errors.EXIT_RETRYABLE, out[-3000:]
  assert "ckpt-30.data-00000-of-00001 is damaged" in out
  assert "Skipping ckpt-10: only the newest checkpoint is evaluated" in out
  assert [e["step"] for e in _history(model_dir)] == [20]
  assert ("FATAL RetryableError: Training finished at step 30, but no complete checkpoint of "
          "that step appeared in") in out


@pytest.mark.slow
def test_evaluator_without_new_checkpoints_exits_143_naming_the_wait(tmp_path, tfds_dir):
  args = tiny_flags(str(tmp_path / "run"), tfds_dir, evaluator_timeout_s=3)
  proc, log = _start_evaluator(args, tmp_path / "eval.log")
  start = time.monotonic()
  code = _finish(proc, log)
  out = (tmp_path / "eval.log").read_text()
  assert code == errors.EXIT_RETRYABLE, out[-3000:]
  assert re.search(r"FATAL RetryableError: No new checkpoint appeared in \S+checkpoints for 3s "
                   r"and training has not finished", out), out[-3000:]
  assert "raise --evaluator_timeout_s" in out
  assert time.monotonic() - start < 120


@pytest.mark.slow
def test_sigterm_stops_a_waiting_evaluator_at_once_with_143(tmp_path, tfds_dir):
  args = tiny_flags(str(tmp_path / "run"), tfds_dir, evaluator_timeout_s=600)
  proc, log = _start_evaluator(args, tmp_path / "eval.log")
  _wait_for(tmp_path / "eval.log", lambda t: "Evaluator watching" in t, 180, proc)
  start = time.monotonic()
  proc.send_signal(signal.SIGTERM)
  code = _finish(proc, log, timeout=60)
  out = (tmp_path / "eval.log").read_text()
  assert code == errors.EXIT_RETRYABLE, out[-3000:]
  assert "FATAL RetryableError: Evaluator stopped by SIGTERM after step none" in out
  assert time.monotonic() - start < 30, "not held for the 600 s timeout"


@pytest.mark.slow
def test_evaluator_reads_only_complete_checkpoints_from_a_bucket(emulator, tmp_path, tfds_dir):
  emulator.create_bucket("runs")
  env = child_env(**emulator.env(), TRAINER_CACHE_DIR=tmp_path / "cache",
                  TRAINER_STORAGE_RETRY_DEADLINE_S=60)
  uri = "gs://runs/side"
  trained = run_module("trainer.task", *tiny_flags(uri, tfds_dir, export=False), env=env)
  assert trained.returncode == 0, trained.stdout[-3000:]
  # A newer checkpoint whose upload never finished (no _COMPLETE marker).
  _upload(emulator, "side/checkpoints/ckpt-25/ckpt-25.index", b"half")
  proc, log = _start_evaluator(
      tiny_flags(uri, tfds_dir, evaluator_timeout_s=60),
      tmp_path / "eval.log", env=dict(env, TRAINER_CACHE_DIR=str(tmp_path / "cache-eval")))
  code = _finish(proc, log)
  out = (tmp_path / "eval.log").read_text()
  assert code == 0, out[-3000:]
  assert "ckpt-25 has no _COMPLETE yet" in out
  metrics = json.loads(_read(emulator, "side/metrics.json"))
  history = json.loads(_read(emulator, "side/eval_metrics.json"))["history"]
  assert [e["step"] for e in history] == [20]
  assert history[0]["test_accuracy"] == pytest.approx(metrics["test_accuracy"], abs=1e-9)
  names = emulator.object_names("runs", "side/logs/")
  assert any(n.startswith("side/logs/eval/events.out.tfevents.") for n in names), names


def _upload(emulator, name, body):
  import urllib.parse
  import urllib.request
  url = (f"{emulator.host}/upload/storage/v1/b/runs/o?uploadType=media&name="
         f"{urllib.parse.quote(name, safe='')}")
  urllib.request.urlopen(urllib.request.Request(url, data=body, method="POST")).read()


def _read(emulator, name):
  import urllib.parse
  import urllib.request
  url = (f"{emulator.host}/download/storage/v1/b/runs/o/{urllib.parse.quote(name, safe='')}"
         "?alt=media")
  with urllib.request.urlopen(url) as response:
    return response.read().decode()
