"""trainer.runtime.gpu: a machine with GPUs TensorFlow cannot use exits 2 instead of training on the CPU."""

import os
import stat

import pytest
import tensorflow as tf

from conftest import child_env, run_module, tiny_flags
from trainer import errors
from trainer.runtime import gpu

CUDA_BUILD = {"is_cuda_build": True, "cuda_version": "12.5.1", "cudnn_version": "9"}


def _fake_nvidia_smi(bin_dir, stdout: str, exit_code: int = 0) -> str:
  """A PATH directory whose nvidia-smi prints stdout: the machine's GPUs, as the check sees them."""
  bin_dir.mkdir(exist_ok=True)
  script = bin_dir / "nvidia-smi"
  script.write_text(f"#!/bin/sh\ncat <<'EOF'\n{stdout}\nEOF\nexit {exit_code}\n")
  script.chmod(script.stat().st_mode | stat.S_IXUSR)
  return str(bin_dir)


def test_nvidia_smi_listing_gpus_is_evidence(tmp_path):
  path = _fake_nvidia_smi(tmp_path / "bin", "GPU 0: NVIDIA L4 (UUID: GPU-1234)\n"
                          "GPU 1: NVIDIA L4 (UUID: GPU-5678)")
  evidence = gpu.nvidia_gpus(path, dev_dir=str(tmp_path / "dev"))
  assert "-L` lists 2 GPU(s)" in evidence


def test_nvidia_smi_without_gpus_is_no_evidence(tmp_path):
  """The tool alone (drivers on a CPU machine) does not make the machine a GPU machine."""
  path = _fake_nvidia_smi(tmp_path / "bin", "No devices were found", exit_code=6)
  assert gpu.nvidia_gpus(path, dev_dir=str(tmp_path / "dev")) == ""


def test_device_nodes_are_evidence(tmp_path):
  dev = tmp_path / "dev"
  dev.mkdir()
  for name in ("nvidiactl", "nvidia-uvm"):  # present without any GPU: not evidence
    (dev / name).write_text("")
  assert gpu.nvidia_gpus(str(tmp_path / "empty_path"), dev_dir=str(dev)) == ""
  (dev / "nvidia0").write_text("")
  assert gpu.nvidia_gpus(str(tmp_path / "empty_path"), dev_dir=str(dev)) == f"{dev}/nvidia0 exist"


def test_this_machine_has_no_nvidia_gpus():
  assert gpu.nvidia_gpus() == "", "the CLI tests below rely on a machine without NVIDIA GPUs"


@pytest.mark.parametrize("value, expected", [
    (None, False), ("", True), ("-1", True), (" -1 ", True), ("-1,0", True), ("0", False),
    ("0,-1", False), ("GPU-8932f937", False)])
def test_cpu_on_purpose(value, expected):
  environ = {} if value is None else {"CUDA_VISIBLE_DEVICES": value}
  assert gpu.cpu_on_purpose(environ) is expected


@pytest.mark.parametrize("require, gpus, evidence, chosen", [
    (False, 0, "", False),  # a CPU machine
    (False, 0, "/dev/nvidia0 exist", True),  # GPUs hidden on purpose
    (True, 1, "", False),  # required and seen
    (False, 2, "/dev/nvidia0 exist", False),
])
def test_check_allows(require, gpus, evidence, chosen):
  gpu.check(require, gpus, evidence, chosen, CUDA_BUILD, "2.21.0")


def _refusal(*args) -> str:
  with pytest.raises(errors.ConfigError) as raised:
    gpu.check(*args)
  message = str(raised.value)
  assert "sees no GPU: refusing to train on the CPU" in message
  return message


BUILT_FOR = "TensorFlow 2.21.0 (built for CUDA 12.5.1, cuDNN 9) sees no GPU"
FIX = "deploy/Dockerfile on TensorFlow 2.21.0, or install matching CUDA libraries with " \
      "`pip install 'tensorflow[and-cuda]==2.21.0'`"


def test_refuses_nvidia_machine_whose_gpus_tensorflow_cannot_load():
  message = _refusal(False, 0, "/dev/nvidia0 exist", False, CUDA_BUILD, "2.21.0")
  assert message.startswith("this machine has NVIDIA GPUs (/dev/nvidia0 exist), but " + BUILT_FOR)
  assert "needs the CUDA/cuDNN versions above, which this image does not carry" in message
  assert FIX in message
  assert message.endswith("To train on the CPU on purpose, set CUDA_VISIBLE_DEVICES=-1.")


def test_refuses_required_gpu_on_nvidia_machine():
  message = _refusal(True, 0, "/dev/nvidia0 exist", False, CUDA_BUILD, "2.21.0")
  assert message.startswith("--require_gpu is set and this machine has NVIDIA GPUs")
  assert FIX in message
  assert message.endswith("set CUDA_VISIBLE_DEVICES=-1 and drop --require_gpu.")


def test_refuses_required_gpu_without_hardware():
  message = _refusal(True, 0, "", False, CUDA_BUILD, "2.21.0")
  assert message.startswith("--require_gpu is set, but " + BUILT_FOR)
  assert "this machine shows no NVIDIA GPU" in message and "accelerator" in message
  assert message.endswith("To train on the CPU on purpose, drop --require_gpu.")


def test_required_gpu_beats_hidden_gpus():
  message = _refusal(True, 0, "/dev/nvidia0 exist", True, CUDA_BUILD, "2.21.0")
  assert message.startswith("--require_gpu is set, but")
  assert "CUDA_VISIBLE_DEVICES hides every GPU; unset it" in message


def test_refusal_names_a_cpu_only_build():
  message = _refusal(False, 0, "/dev/nvidia0 exist", False, {"is_cuda_build": False}, "2.21.0")
  assert "TensorFlow 2.21.0 (a build without CUDA support, e.g. tensorflow-cpu) sees no GPU" in (
      message)
  assert "cannot use GPUs at all" in message and FIX in message


@pytest.mark.slow
@pytest.mark.parametrize("how", ["flag", "nvidia-smi"])
def test_cli_refuses_cpu_fallback(tmp_path, how):
  """End to end: exit 2 with the cause and fix, before any data, checkpoint or output."""
  model_dir = tmp_path / "run"
  args = tiny_flags(str(model_dir), str(tmp_path / "tfds"))
  env = child_env()
  if how == "flag":
    args.append("--require_gpu")
  else:
    env["PATH"] = _fake_nvidia_smi(tmp_path / "bin", "GPU 0: Tesla T4 (UUID: GPU-1)") + (
        os.pathsep + env["PATH"])
  result = run_module("trainer.task", *args, env=env, timeout=120)
  assert result.returncode == errors.EXIT_CONFIG, result.stdout[-3000:]
  assert "sees no GPU: refusing to train on the CPU" in result.stdout
  cuda = tf.sysconfig.get_build_info()["cuda_version"]
  build = f"TensorFlow {tf.__version__} (built for CUDA {cuda}"
  assert build in result.stdout
  if how == "flag":  # this machine has no GPU at all
    assert "this machine shows no NVIDIA GPU" in result.stdout
  else:
    assert "`pip install 'tensorflow[and-cuda]==" in result.stdout
  assert f"TensorFlow {tf.__version__} sees 0 GPU(s)." in result.stdout  # the start-up log
  assert not model_dir.exists(), "no checkpoint or output for a refused run"
  assert not (tmp_path / "tfds").exists(), "refused before preparing data"


@pytest.mark.slow
def test_cli_cpu_on_purpose_passes_the_check(tmp_path):
  """NVIDIA GPUs hidden with CUDA_VISIBLE_DEVICES=-1: the run gets past the GPU check (and then
  stops at the unwritable --data_dir, exit 3, to stay short)."""
  blocker = tmp_path / "a_file"
  blocker.write_text("x")
  env = child_env(CUDA_VISIBLE_DEVICES="-1")
  env["PATH"] = _fake_nvidia_smi(tmp_path / "bin", "GPU 0: Tesla T4 (UUID: GPU-1)") + (
      os.pathsep + env["PATH"])
  result = run_module("trainer.task", *tiny_flags(str(tmp_path / "run"), str(blocker / "tfds")),
                      env=env, timeout=120)
  assert result.returncode == errors.EXIT_DATA, result.stdout[-3000:]
  assert "CUDA_VISIBLE_DEVICES='-1' hides every GPU: training on the CPU on purpose" in (
      result.stdout)
  assert "is not writable" in result.stdout
