"""The GPU switches on 2 CPU replicas: --precision (bfloat16, float16 with loss scaling, float32,
and a resume across policies), --xla and --collective_implementation=nccl's refusal on a machine
without GPUs."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from conftest import child_env, run_module, run_without_tf, tiny_flags
from trainer import errors
from trainer.runtime import gpu
from trainer import step


def test_nccl_needs_nvidia_gpus(tmp_path):
  no_gpu = dict(environ={}, path=str(tmp_path / "empty_path"), dev_dir=str(tmp_path))
  with pytest.raises(errors.ConfigError, match="--collective_implementation=nccl, but this "
                     "machine shows no NVIDIA GPU"):
    gpu.check_collective_implementation("nccl", **no_gpu)
  for allowed in ("auto", "ring"):
    gpu.check_collective_implementation(allowed, **no_gpu)
  (tmp_path / "nvidia0").write_text("")  # the device node a GPU's driver creates
  gpu.check_collective_implementation("nccl", **no_gpu)
  with pytest.raises(errors.ConfigError, match="CUDA_VISIBLE_DEVICES='-1' hides every GPU"):
    gpu.check_collective_implementation("nccl", {"CUDA_VISIBLE_DEVICES": "-1"},
                                        str(tmp_path / "empty_path"), str(tmp_path))


def test_cli_refuses_nccl_without_gpus_before_tensorflow_loads(tmp_path):
  assert gpu.nvidia_gpus() == "", "this test needs a machine without NVIDIA GPUs"
  result = run_without_tf("trainer.task", *tiny_flags(str(tmp_path / "run"),
                                                      str(tmp_path / "tfds")),
                          "--collective_implementation=nccl")
  assert result.returncode == errors.EXIT_CONFIG, result.stdout[-2000:]
  assert "FATAL ConfigError: --collective_implementation=nccl" in result.stdout
  assert "use --collective_implementation=auto" in result.stdout
  assert "Traceback" not in result.stdout and not (tmp_path / "run").exists()


# name -> (extra flags, extra environment, what the log must say)
SWITCHES = {
    # A CPU's own mixed precision: bfloat16 has float32's range, so no loss scaling.
    "mixed_bfloat16": (["--precision=mixed"], {},
                       "Precision policy mixed_bfloat16, no loss scaling."),
    # A GPU's: float16 with dynamic loss scaling, forced onto the CPU by the test hook (and the
    # flag's old spelling).
    "mixed_float16": (["--mixed_precision"], {step.POLICY_OVERRIDE: "mixed_float16"},
                      "Precision policy mixed_float16, loss scaled dynamically by "
                      "LossScaleOptimizer"),
    # TensorFlow's C++ log (level 0) says when XLA compiled the step.
    "xla": (["--xla"], {"TF_CPP_MIN_LOG_LEVEL": "0"}, "Compiled cluster using XLA!"),
    "float32": (["--precision=float32"], {}, "Precision policy float32, no loss scaling."),
}


def _train(tmp_path, tfds_dir, switch, steps, **flags):
  extra_flags, extra_env, _ = SWITCHES[switch]
  args = tiny_flags(str(tmp_path / "run"), tfds_dir, num_cpu_devices=2, train_steps=steps,
                    log_every_steps=5, **flags) + extra_flags
  result = run_module("trainer.task", *args, env=child_env(**extra_env))
  assert result.returncode == 0, result.stdout[-3000:]
  assert "Strategy mirrored with 2 replica(s)" in result.stdout
  assert SWITCHES[switch][2] in result.stdout
  with open(tmp_path / "run" / "metrics.json") as f:
    return result.stdout, json.load(f)


@pytest.mark.slow
@pytest.mark.parametrize("switch", sorted(SWITCHES))
def test_switch_trains_resumes_and_serves_float32(tmp_path, tfds_dir, switch):
  """30 steps under MirroredStrategy on 2 CPU devices lower the loss and save ckpt-30; 10 more
  resume from it; the export serves float32 probabilities for uint8 images."""
  log, metrics = _train(tmp_path, tfds_dir, switch, 30, export=False)
  losses = [float(x) for x in re.findall(r"step \d+/30 loss ([\d.]+)", log)]
  assert len(losses) == 6 and losses[-1] < 0.7 * losses[0], losses
  assert metrics["global_step"] == 30 and metrics["num_replicas"] == 2
  ckpt_dir = tmp_path / "run" / "checkpoints"
  assert os.path.exists(ckpt_dir / "ckpt-30.index")

  log, metrics = _train(tmp_path, tfds_dir, switch, 40)
  assert f"Restored {ckpt_dir / 'ckpt-30'}" in log
  assert metrics["start_step"] == 30 and metrics["global_step"] == 40
  assert metrics["test_accuracy"] > 0.5, metrics
  if switch != "xla":  # the other switches are precisions
    assert metrics["precision"] == switch
  saved = dict(tf.train.list_variables(str(ckpt_dir / "ckpt-40")))
  # The loss scale is part of the checkpoint exactly when float16 scales the loss.
  assert ("optimizer/dynamic_scale/.ATTRIBUTES/VARIABLE_VALUE" in saved) == (
      switch == "mixed_float16")

  serve = tf.saved_model.load(str(tmp_path / "run" / "export")).signatures["serving_default"]
  images = np.random.default_rng(0).integers(0, 256, (16, 28, 28, 1), dtype=np.uint8)
  out = serve(images=tf.constant(images))
  assert out["probabilities"].dtype == tf.float32 and out["probabilities"].shape == (16, 10)
  np.testing.assert_allclose(out["probabilities"].numpy().sum(axis=1), 1.0, rtol=1e-5)
  np.testing.assert_array_equal(out["classes"].numpy(),
                                out["probabilities"].numpy().argmax(axis=1))


@pytest.mark.slow
def test_a_bfloat16_checkpoint_resumes_in_float32_and_back(tmp_path, tfds_dir):
  """A run preempted on a CPU with bfloat16 and rescheduled onto one without (--precision=auto
  then picks float32) resumes: variables are float32 under both policies, and no loss scale is
  saved for bfloat16. Both directions, on the same model_dir."""
  start = 0
  legs = (("mixed_bfloat16", 20), ("float32", 30), ("mixed_bfloat16", 40))
  for switch, steps in legs:
    log, metrics = _train(tmp_path, tfds_dir, switch, steps, export=False)
    assert metrics["global_step"] == steps and metrics["start_step"] == start
    assert start == 0 or re.search(rf"Restored \S+ckpt-{start}\b", log), log[-2000:]
    start = steps
  assert metrics["test_accuracy"] > 0.5, metrics
  # metrics.json tells each stretch's policy, not the last one's alone.
  assert metrics["precision_segments"] == [
      {"steps": [1, 20], "precision": "mixed_bfloat16"},
      {"steps": [21, 30], "precision": "float32"},
      {"steps": [31, 40], "precision": "mixed_bfloat16"}]
  assert metrics["precision"] == ("mixed_bfloat16 (steps 1-20), float32 (steps 21-30), "
                                  "mixed_bfloat16 (steps 31-40)")


@pytest.mark.slow
def test_auto_precision_is_bfloat16_only_with_native_bfloat16_and_onednn(tmp_path, tfds_dir):
  """The default --precision=auto in a real run: mixed_bfloat16 exactly when this CPU lists
  AVX512_BF16/AMX, and float32 whenever TF_ENABLE_ONEDNN_OPTS=0 switches oneDNN off."""
  native = step.native_bfloat16(step.cpu_flags())
  for onednn, expected in (("1", "mixed_bfloat16" if native else "float32"), ("0", "float32")):
    model_dir = tmp_path / f"onednn{onednn}"
    result = run_module("trainer.task", *tiny_flags(str(model_dir), tfds_dir, train_steps=5),
                        "--export=false", env=child_env(TF_ENABLE_ONEDNN_OPTS=onednn))
    assert result.returncode == 0, result.stdout[-3000:]
    assert f"Precision policy {expected}, no loss scaling." in result.stdout
    with open(model_dir / "metrics.json") as f:
      assert json.load(f)["precision"] == expected


_OVERFLOW_SCRIPT = """
import json
import keras, numpy as np, tensorflow as tf
from trainer.runtime import cluster
from trainer import config
from trainer.runtime import distribute
from trainer import step
c = config.Config(epochs=1, global_batch_size=8, num_cpu_devices=2, model_widths=(4,),
                  kernel_sizes=(3,), pool_sizes=(2,), precision="mixed")
rt = distribute.create_runtime(c.runtime, c.training.global_batch_size, cluster.ClusterInfo())
step.set_precision_and_seeds(c.training, {step.POLICY_OVERRIDE: "mixed_float16"})
train_step = step.TrainStep(c.model, c.optimizer, c.training, rt, (28, 28, 1), 10, 10)

def replica_input(ctx):  # replica 1's images are inf: only its gradients overflow
  x = np.full((4, 28, 28, 1), np.inf if ctx.input_pipeline_id == 1 else 0.5, np.float32)
  return tf.data.Dataset.from_tensors((x, np.zeros(4, np.int32), np.ones(4, np.float32))).repeat()

per_replica = tf.distribute.InputOptions(
    experimental_fetch_to_device=False,
    experimental_replication_mode=tf.distribute.InputReplicationMode.PER_REPLICA)
iterator = iter(rt.strategy.distribute_datasets_from_function(replica_input, per_replica))
before = train_step.model.get_weights()
train_step.train_chunk(iterator, tf.constant(1), tf.constant(0.0))
after = train_step.model.get_weights()
print(json.dumps({"unchanged": all(np.array_equal(a, b) for a, b in zip(before, after)),
                  "scale": float(train_step.optimizer.dynamic_scale.numpy())}))
"""


@pytest.mark.slow
def test_one_overflowing_replica_skips_the_step_on_every_replica():
  """float16 loss scaling with 2 replicas: when only replica 1's gradients overflow, the step is
  skipped (weights unchanged) and the scale halved, instead of inf reaching the weights."""
  result = subprocess.run([sys.executable, "-c", _OVERFLOW_SCRIPT], env=child_env(),
                          capture_output=True, text=True, timeout=180)
  assert result.returncode == 0, result.stderr[-3000:]
  out = json.loads(result.stdout.strip().splitlines()[-1])
  assert out == {"unchanged": True, "scale": 2.0 ** 14}
