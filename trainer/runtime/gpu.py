"""GPU presence checks: no CPU training by accident on a GPU machine, no NCCL without GPUs."""

import glob
import logging
import os
import shutil
import subprocess

from trainer import errors

# `nvidia-smi -L` answers in well under a second on a healthy driver; one that hangs is a driver
# that exists, so the wait is bounded and a timeout counts as "GPUs present".
NVIDIA_SMI_TIMEOUT_S = 10.0


def nvidia_gpus(path=None, dev_dir: str = "/dev") -> str:
  """Evidence that this machine has NVIDIA GPUs, as text for messages; "" when there is none.

  Device nodes /dev/nvidia0, 1, ... exist once the driver runs (containers get them for their
  GPUs); otherwise `nvidia-smi -L` (searched on `path`, default $PATH) must list a GPU, since the
  tool alone may be installed on a machine without any.
  """
  nodes = sorted(glob.glob(os.path.join(glob.escape(dev_dir), "nvidia[0-9]*")))
  if nodes:
    return f"{', '.join(nodes)} exist"
  smi = shutil.which("nvidia-smi", path=path)
  if not smi:
    return ""
  try:
    listing = subprocess.run([smi, "-L"], stdin=subprocess.DEVNULL, capture_output=True,
                             text=True, timeout=NVIDIA_SMI_TIMEOUT_S)
  except subprocess.TimeoutExpired:
    return f"{smi} exists but did not answer within {NVIDIA_SMI_TIMEOUT_S:.0f} s"
  except OSError:
    return ""
  listed = [line for line in listing.stdout.splitlines() if line.startswith("GPU ")]
  return f"`{smi} -L` lists {len(listed)} GPU(s)" if listed else ""


def cpu_on_purpose(environ) -> bool:
  """True when CUDA_VISIBLE_DEVICES hides every GPU: "" or a list starting with -1.

  CUDA shows no device for an empty value, and only the devices before the first invalid index
  such as -1 (CUDA Programming Guide, "CUDA Environment Variables", CUDA_VISIBLE_DEVICES).
  """
  value = environ.get("CUDA_VISIBLE_DEVICES")
  if value is None:
    return False
  first = value.split(",")[0].strip()
  return first == "" or (first.startswith("-") and first[1:].isdigit())


def _tensorflow_build(build_info: dict, tf_version: str) -> str:
  """E.g. "TensorFlow 2.21.0 (built for CUDA 12.5.1, cuDNN 9)": tf.sysconfig.get_build_info()."""
  if build_info.get("is_cuda_build") is False:
    return f"TensorFlow {tf_version} (a build without CUDA support, e.g. tensorflow-cpu)"
  cuda = build_info.get("cuda_version")
  cudnn = build_info.get("cudnn_version")
  built_for = f"CUDA {cuda}, cuDNN {cudnn}" if cuda and cudnn else "a CUDA it does not report"
  return f"TensorFlow {tf_version} (built for {built_for})"


def _cause_and_fix(nvidia_evidence: str, cpu_chosen: bool, build_info: dict,
                   tf_version: str) -> str:
  if cpu_chosen:
    return "Cause: CUDA_VISIBLE_DEVICES hides every GPU; unset it"
  if not nvidia_evidence:
    return ("Cause: this machine shows no NVIDIA GPU (no /dev/nvidia[0-9]* device, none listed "
            "by `nvidia-smi -L`): run the job on a machine with one (a Vertex AI accelerator, or "
            "an nvidia.com/gpu limit on Kubernetes)")
  if build_info.get("is_cuda_build") is False:
    cause = "this TensorFlow cannot use GPUs at all"
  else:
    cause = ("this TensorFlow needs the CUDA/cuDNN versions above, which this image does not "
             "carry (typical when pip upgrades TensorFlow past a prebuilt container's CUDA; "
             "TensorFlow's log above names what failed, e.g. 'Cannot dlopen some GPU libraries')")
  return (f"Likely cause: {cause}. Fix: run the image built from deploy/Dockerfile on TensorFlow "
          f"{tf_version}, or install matching CUDA libraries with "
          f"`pip install 'tensorflow[and-cuda]=={tf_version}'`")


def check(require_gpu: bool, num_gpus: int, nvidia_evidence: str, cpu_chosen: bool,
          build_info: dict, tf_version: str) -> None:
  """Raises ConfigError when a GPU is needed (flag or NVIDIA hardware) but TensorFlow sees none.

  CUDA_VISIBLE_DEVICES hiding every GPU waives the hardware rule (CPU on purpose), never the flag.
  """
  if num_gpus:
    return
  reasons = []
  if require_gpu:
    reasons.append("--require_gpu is set")
  if nvidia_evidence and not cpu_chosen:
    reasons.append(f"this machine has NVIDIA GPUs ({nvidia_evidence})")
  if not reasons:
    return
  if require_gpu and (cpu_chosen or not nvidia_evidence):
    cpu_escape = "drop --require_gpu"
  else:
    cpu_escape = "set CUDA_VISIBLE_DEVICES=-1" + (" and drop --require_gpu" if require_gpu else "")
  raise errors.ConfigError(
      f"{' and '.join(reasons)}, but {_tensorflow_build(build_info, tf_version)} sees no GPU: "
      f"refusing to train on the CPU. "
      f"{_cause_and_fix(nvidia_evidence, cpu_chosen, build_info, tf_version)}. "
      f"To train on the CPU on purpose, {cpu_escape}.")


def usable_gpus(require_gpu: bool, environ=None) -> list:
  """TensorFlow's physical GPUs, after refusing a run that would silently fall back to the CPU."""
  import tensorflow as tf
  environ = os.environ if environ is None else environ
  gpus = tf.config.list_physical_devices("GPU")
  logging.info("TensorFlow %s sees %d GPU(s)%s", tf.__version__, len(gpus),
               ": " + ", ".join(g.name for g in gpus) if gpus else ".")
  if gpus:
    return gpus
  chosen = cpu_on_purpose(environ)
  if chosen and not require_gpu:
    logging.info("CUDA_VISIBLE_DEVICES=%r hides every GPU: training on the CPU on purpose.",
                 environ["CUDA_VISIBLE_DEVICES"])
    return gpus
  check(require_gpu, 0, nvidia_gpus(environ.get("PATH")), chosen,
        dict(tf.sysconfig.get_build_info()), tf.__version__)
  return gpus


def check_collective_implementation(implementation: str, environ=None, path=None,
                                    dev_dir: str = "/dev") -> None:
  """--collective_implementation=nccl needs NVIDIA GPUs: refused before TensorFlow loads.

  NCCL reduces GPU tensors only (TensorFlow falls back to RING for CPU ones), so asking for it
  on a machine without GPUs, or with every GPU hidden, is a mistake to report, not to ignore.
  """
  if implementation != "nccl":
    return
  environ = os.environ if environ is None else environ
  if cpu_on_purpose(environ):
    raise errors.ConfigError(
        f"--collective_implementation=nccl, but CUDA_VISIBLE_DEVICES="
        f"{environ['CUDA_VISIBLE_DEVICES']!r} hides every GPU and NCCL reduces only on GPUs: "
        "unset CUDA_VISIBLE_DEVICES, or use --collective_implementation=auto (RING on CPUs).")
  if not nvidia_gpus(environ.get("PATH") if path is None else path, dev_dir):
    raise errors.ConfigError(
        "--collective_implementation=nccl, but this machine shows no NVIDIA GPU (no "
        "/dev/nvidia[0-9]* device, none listed by `nvidia-smi -L`) and NCCL reduces only on "
        "GPUs: use --collective_implementation=auto (NCCL with GPUs, RING on CPUs) or ring, or "
        "run the job on GPUs.")
