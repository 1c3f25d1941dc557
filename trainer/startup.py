"""Every start-up trick of the trainer, each with the public way it falls back to.

A trick leans on something TensorFlow, Keras, TFDS or CPython does not promise. Each one has a
fallback on public API, used when the private thing is missing, and a check in
tests/startup_test.py that fails, naming the trick, when an upgrade changes what it relies on.
What each one saves is measured in bench/README.md ("Start-up tricks").

- set_tensorflow_environment: TensorFlow reads TF_ENABLE_ONEDNN_OPTS and TF_CPP_MIN_LOG_LEVEL
  when it loads (both documented; nothing private, nothing to fall back from).
- skip_plotting_imports: Keras imports matplotlib only inside `try: ... except ImportError`;
  the None entry in sys.modules is the import system's documented rule.
- exit_without_teardown: atexit._run_exitfuncs runs the exit handlers before os._exit; without
  it, sys.exit and the interpreter's teardown.
- onednn_enabled: tensorflow.python.util._pywrap_util_port.IsMklEnabled; without it,
  TensorFlow's rule (onednn_by_rule) from $TF_ENABLE_ONEDNN_OPTS and the CPU's flags.

Two more live with the layer they serve, because this module is in the base layer and imports
no other trainer module:
- trainer/data/tfds_metadata.py opens a prepared TFDS dataset from its metadata files without
  importing TFDS; it relies on TFDS's on-disk layout (dataset_info.json, features.json, the
  feature class names, the shard file template) and falls back to tfds.builder_from_directory
  for any other layout.
- trainer/logs.py load_tensorflow holds back TensorFlow's native start-up notices, which no
  public switch reaches; it relies on their line format, and any line it does not recognise is
  shown.

Entry points (trainer/task.py, trainer/predict.py; the launcher's children run trainer.task)
call set_tensorflow_environment() first, before anything can load TensorFlow. A notebook or
another program that imports the trainer calls it too, before its first `import tensorflow`, to
train as the command line does.
"""

import atexit
import os
import platform
import sys

from absl import logging

# TensorFlow's oneDNN default (DefaultOneDnnPolicy in tensorflow/core/util/port.cc): on Linux,
# on by default only where the CPU has one of these, by the names Linux gives them in
# /proc/cpuinfo (arch/x86/include/asm/cpufeatures.h).
ONEDNN_DEFAULT_CPU_FLAGS = frozenset(
    {"avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16"})


def set_tensorflow_environment(environ=None) -> None:
  """Defaults for the variables TensorFlow reads once, when it loads; a value the user set wins.

  TF_ENABLE_ONEDNN_OPTS=1: TensorFlow turns its oneDNN CPU kernels on by itself only on CPUs
  with AVX-512 VNNI/BF16 or AMX (ONEDNN_DEFAULT_CPU_FLAGS); on other x86 CPUs they still run
  this CNN faster (bench/README.md), and they are the only kernels with native bfloat16.
  TF_CPP_MIN_LOG_LEVEL=1: C++ INFO logs (oneDNN, CUDA probing) drown the training log; WARNING
  and up still show. Call before TensorFlow loads: later it changes nothing.
  """
  environ = os.environ if environ is None else environ
  environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
  environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")


def skip_plotting_imports(modules=None) -> None:
  """Keeps matplotlib out of the process: Keras, which `import tensorflow` loads, imports pyplot
  and matplotlib.patches when they are installed (keras/src/visualization/, each inside
  `try: ... except ImportError`) for plotting helpers the trainer never calls. A None entry in
  sys.modules makes `import matplotlib` raise ImportError at once (the import system's
  documented rule for None entries). Call before TensorFlow loads; a process that already has
  matplotlib keeps it."""
  (sys.modules if modules is None else modules).setdefault("matplotlib", None)


def exit_without_teardown(code: int) -> None:
  """Leaves at once, after the exit handlers: every output is written and closed by then, and
  the interpreter's teardown of TensorFlow's runtime only adds to every run's wall time. The
  atexit handlers still run (autograph deletes its generated temporary files in one).

  atexit._run_exitfuncs runs the handlers; where a Python lacks it, the process leaves through
  sys.exit and the normal teardown instead (same exit code, same handlers, slower)."""
  run_exit_handlers = getattr(atexit, "_run_exitfuncs", None)
  if not callable(run_exit_handlers):
    sys.exit(code)
  run_exit_handlers()
  logging.flush()
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)  # documented: exits without cleanup handlers or flushing stdio buffers


def onednn_enabled(cpu_flags) -> bool:
  """Whether this process's TensorFlow runs its oneDNN CPU kernels, the only ones with native
  bfloat16: TensorFlow's own answer (IsMklEnabled in tensorflow/core/util/port.cc, exposed as
  tensorflow.python.util._pywrap_util_port), else onednn_by_rule(os.environ, cpu_flags).
  cpu_flags: the CPU's feature flags, as /proc/cpuinfo lists them."""
  try:
    from tensorflow.python.util import _pywrap_util_port  # pylint: disable=import-outside-toplevel
    is_mkl_enabled = _pywrap_util_port.IsMklEnabled
  except (ImportError, AttributeError):
    return onednn_by_rule(os.environ, cpu_flags)
  return bool(is_mkl_enabled())


def onednn_by_rule(environ, cpu_flags, machine: str = "", system: str = "") -> bool:
  """TensorFlow's rule for oneDNN (IsMklEnabled and DefaultOneDnnPolicy in
  tensorflow/core/util/port.cc), for its x86-64 builds, which include oneDNN: an explicit
  TF_ENABLE_ONEDNN_OPTS (0/false or 1/true, any case) decides; else Linux turns it on for the
  CPUs of ONEDNN_DEFAULT_CPU_FLAGS and Windows always. Anything else answers False, so
  --precision=auto keeps float32 where it cannot tell."""
  machine = (machine or platform.machine()).lower()
  system = system or platform.system()
  if machine not in ("x86_64", "amd64"):
    return False
  value = environ.get("TF_ENABLE_ONEDNN_OPTS", "").lower()
  if value in ("1", "true"):
    return True
  if value in ("0", "false"):
    return False
  if system == "Windows":
    return True
  return system == "Linux" and bool(ONEDNN_DEFAULT_CPU_FLAGS & set(cpu_flags))
