"""trainer/startup.py: each start-up trick works, falls back to public API when what it leans on
is missing, and fails here, naming the trick, when a TensorFlow, Keras, TFDS or Python upgrade
changes what it relies on."""

import ast
import atexit
import importlib.machinery
import importlib.util
import json
import os
import platform
import subprocess
import sys

import pytest

from conftest import ROOT, child_env
from trainer import logs
from trainer import startup

ENV_NAMES = ("TF_ENABLE_ONEDNN_OPTS", "TF_CPP_MIN_LOG_LEVEL")


def _python(code, *args, env=None, timeout=120):
  return subprocess.run([sys.executable, "-c", code, *args], env=env or child_env(), cwd=ROOT,
                        capture_output=True, text=True, timeout=timeout)


def _cpu_flags() -> set:
  from trainer import step  # imports TensorFlow
  return step.cpu_flags()


# ---- set_tensorflow_environment: explicit, from the entry points, before TensorFlow ----

def test_tensorflow_environment_defaults_and_the_users_values_win():
  environ = {}
  startup.set_tensorflow_environment(environ)
  assert environ == {"TF_ENABLE_ONEDNN_OPTS": "1", "TF_CPP_MIN_LOG_LEVEL": "1"}
  environ = {"TF_ENABLE_ONEDNN_OPTS": "0", "TF_CPP_MIN_LOG_LEVEL": "0"}
  startup.set_tensorflow_environment(environ)
  assert environ == {"TF_ENABLE_ONEDNN_OPTS": "0", "TF_CPP_MIN_LOG_LEVEL": "0"}


def test_importing_the_trainer_changes_nothing_in_the_process():
  """No import side effect: a notebook that imports the package keeps its own environment."""
  code = ("import os, sys\n"
          "before = dict(os.environ)\n"
          "import trainer, trainer.task, trainer.predict, trainer.launcher, trainer.startup\n"
          "assert dict(os.environ) == before, set(os.environ.items()) ^ set(before.items())\n"
          "assert 'matplotlib' not in sys.modules and 'tensorflow' not in sys.modules\n")
  env = {k: v for k, v in child_env().items() if k not in ENV_NAMES}
  result = _python(code, env=env)
  assert result.returncode == 0, result.stderr[-3000:]


def _fake_tensorflow(tmp_path):
  """A `tensorflow` package that reports the process's state when it is imported, then exits:
  what the real one would find when it loads."""
  package = tmp_path / "fake" / "tensorflow"
  package.mkdir(parents=True, exist_ok=True)
  (package / "__init__.py").write_text(
      "import json, os, sys\n"
      "sys.stdout.write('AT_TENSORFLOW_IMPORT ' + json.dumps({\n"
      f"    'environ': {{k: os.environ.get(k) for k in {ENV_NAMES!r}}},\n"
      "    'matplotlib_blocked': 'matplotlib' in sys.modules and sys.modules['matplotlib'] is None"
      "}) + '\\n')\n"
      "sys.stdout.flush()\n"
      "os._exit(0)\n")
  return str(tmp_path / "fake")


def _state_at_tensorflow_import(module, args, tmp_path, **env):
  base = {k: v for k, v in child_env().items() if k not in ENV_NAMES}
  base.update(PYTHONPATH=os.pathsep.join([ROOT, _fake_tensorflow(tmp_path)]), **env)
  result = subprocess.run([sys.executable, "-m", module, *args], env=base, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
  lines = [l for l in result.stdout.splitlines() if l.startswith("AT_TENSORFLOW_IMPORT ")]
  assert result.returncode == 0 and len(lines) == 1, result.stdout[-2000:] + result.stderr[-3000:]
  return json.loads(lines[0].split(" ", 1)[1])


def test_the_trainer_sets_tensorflows_environment_before_tensorflow_loads(tmp_path):
  args = [f"--model_dir={tmp_path / 'run'}", f"--data_dir={tmp_path / 'tfds'}",
          "--train_steps=1"]
  state = _state_at_tensorflow_import("trainer.task", args, tmp_path)
  assert state == {"environ": {"TF_ENABLE_ONEDNN_OPTS": "1", "TF_CPP_MIN_LOG_LEVEL": "1"},
                   "matplotlib_blocked": True}
  # An explicit value of the user's wins.
  state = _state_at_tensorflow_import("trainer.task", args, tmp_path, TF_ENABLE_ONEDNN_OPTS="0")
  assert state["environ"]["TF_ENABLE_ONEDNN_OPTS"] == "0"


def test_predict_sets_tensorflows_environment_before_tensorflow_loads(tmp_path):
  export = tmp_path / "run" / "export"
  (export / "variables").mkdir(parents=True)
  for name in ("saved_model.pb", "variables/variables.index",
               "variables/variables.data-00000-of-00001"):
    (export / name).write_bytes(b"")  # find_export checks the files are there, not their bytes
  state = _state_at_tensorflow_import("trainer.predict",
                                      [f"--model_dir={tmp_path / 'run'}", "--samples=1"], tmp_path)
  assert state["environ"] == {"TF_ENABLE_ONEDNN_OPTS": "1", "TF_CPP_MIN_LOG_LEVEL": "1"}


# ---- exit_without_teardown: atexit._run_exitfuncs, else sys.exit ----

def test_cpython_still_has_the_exit_handler_runner():
  assert callable(getattr(atexit, "_run_exitfuncs", None)), (
      "atexit._run_exitfuncs is gone in this Python: startup.exit_without_teardown now leaves "
      "through sys.exit and the interpreter's teardown (correct, but slower: bench/README.md); "
      "find the new way to run the exit handlers before os._exit")


_EXIT = """
import atexit, sys, threading, time
from trainer import startup
atexit.register(print, "exit handler ran", flush=True)
if sys.argv[1] == "fallback":
  del atexit._run_exitfuncs  # as in a Python without it
else:
  # A non-daemon thread that never ends: the interpreter's teardown would wait for it forever.
  threading.Thread(target=time.sleep, args=(600,)).start()
startup.exit_without_teardown(3)
"""


def test_exit_runs_the_handlers_and_skips_the_teardown():
  result = _python(_EXIT, "private", timeout=60)
  assert result.returncode == 3, result.stderr[-3000:]
  assert result.stdout.splitlines() == ["exit handler ran"]  # once: os._exit runs none again


def test_exit_without_the_private_runner_tears_down_as_usual():
  result = _python(_EXIT, "fallback", timeout=60)
  assert result.returncode == 3, result.stderr[-3000:]
  assert result.stdout.splitlines() == ["exit handler ran"]


# ---- onednn_enabled: TensorFlow's IsMklEnabled, else TensorFlow's rule ----

def test_tensorflow_still_exposes_its_onednn_answer():
  try:
    from tensorflow.python.util import _pywrap_util_port
  except ImportError as e:
    pytest.fail(f"tensorflow.python.util._pywrap_util_port is gone ({e}): startup.onednn_enabled "
                "now answers by onednn_by_rule; check that rule against tensorflow/core/util/"
                "port.cc of this TensorFlow, or find where IsMklEnabled moved")
  assert callable(getattr(_pywrap_util_port, "IsMklEnabled", None)), (
      "_pywrap_util_port.IsMklEnabled is gone: startup.onednn_enabled answers by its rule now")


def test_onednn_answer_agrees_with_tensorflows_rule_here():
  """TensorFlow's own answer, in this process, is what the fallback rule says for it."""
  cpu_flags = _cpu_flags()
  assert startup.onednn_enabled(cpu_flags) == startup.onednn_by_rule(os.environ, cpu_flags)


def test_onednn_falls_back_to_the_rule(monkeypatch):
  cpu_flags = _cpu_flags()
  from tensorflow.python.util import _pywrap_util_port
  monkeypatch.delattr(_pywrap_util_port, "IsMklEnabled")
  answers = {}
  for value in ("0", "1"):
    monkeypatch.setenv("TF_ENABLE_ONEDNN_OPTS", value)
    answers[value] = startup.onednn_enabled(cpu_flags)
    assert answers[value] is startup.onednn_by_rule(os.environ, cpu_flags)
  if platform.machine() == "x86_64":
    assert answers == {"0": False, "1": True}  # read from the variable, now


@pytest.mark.parametrize("environ, flags, machine, system, expected", [
    ({"TF_ENABLE_ONEDNN_OPTS": "1"}, set(), "x86_64", "Linux", True),
    ({"TF_ENABLE_ONEDNN_OPTS": "TRUE"}, set(), "x86_64", "Linux", True),
    ({"TF_ENABLE_ONEDNN_OPTS": "0"}, {"avx512_vnni"}, "x86_64", "Linux", False),
    ({"TF_ENABLE_ONEDNN_OPTS": "False"}, {"amx_bf16"}, "x86_64", "Linux", False),
    ({}, {"avx2", "fma"}, "x86_64", "Linux", False),  # AVX2 only: off by default
    ({}, {"avx2", "avx512f", "avx512_vnni"}, "x86_64", "Linux", True),
    ({}, {"avx512_bf16"}, "x86_64", "Linux", True),
    ({"TF_ENABLE_ONEDNN_OPTS": "yes"}, {"avx2"}, "x86_64", "Linux", False),  # not a bool: default
    ({}, set(), "AMD64", "Windows", True),
    ({"TF_ENABLE_ONEDNN_OPTS": "1"}, set(), "aarch64", "Linux", False),  # cannot tell: float32
])
def test_onednn_rule(environ, flags, machine, system, expected):
  assert startup.onednn_by_rule(environ, flags, machine, system) is expected


_ONEDNN = """
import json
from tensorflow.python.util import _pywrap_util_port
from trainer import startup, step
flags = step.cpu_flags()
print(json.dumps([bool(_pywrap_util_port.IsMklEnabled()), startup.onednn_by_rule(
    __import__("os").environ, flags)]))
"""


@pytest.mark.slow
@pytest.mark.parametrize("value", ["0", "1"])
def test_tensorflow_reads_the_onednn_variable_as_the_rule_says(value):
  """TensorFlow reads TF_ENABLE_ONEDNN_OPTS once, when it loads: a process per value."""
  result = _python(_ONEDNN, env=child_env(TF_ENABLE_ONEDNN_OPTS=value), timeout=180)
  assert result.returncode == 0, result.stderr[-3000:]
  private, rule = json.loads(result.stdout.splitlines()[-1])
  assert private == rule == (value == "1"), (private, rule)


# ---- skip_plotting_imports: Keras imports matplotlib only where ImportError is caught ----

def _keras_matplotlib_imports():
  """(file, line, guarded) for each module-level import of matplotlib in Keras' sources."""
  root = os.path.dirname(importlib.util.find_spec("keras").origin)
  found = []
  for folder, _, files in os.walk(root):
    for name in files:
      if not name.endswith(".py"):
        continue
      path = os.path.join(folder, name)
      with open(path, encoding="utf-8") as f:
        source = f.read()
      if "matplotlib" not in source:
        continue
      found += _module_level_imports(ast.parse(source, path), path, "matplotlib")
  return found


def _module_level_imports(tree, path, package, guarded=False):
  out = []
  for node in ast.iter_child_nodes(tree):
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
      continue  # runs only when called
    if isinstance(node, ast.Try):
      catches = any(_catches_import_error(h.type) for h in node.handlers)
      for child in node.body:
        out += _module_level_imports(ast.Module([child], []), path, package, guarded or catches)
      for part in (node.orelse, node.finalbody, *[h.body for h in node.handlers]):
        out += _module_level_imports(ast.Module(part, []), path, package, guarded)
      continue
    names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
             [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
    if any(n == package or n.startswith(package + ".") for n in names):
      out.append((path, node.lineno, guarded))
    elif not isinstance(node, (ast.Import, ast.ImportFrom)):
      out += _module_level_imports(node, path, package, guarded)
  return out


def _catches_import_error(handler_type) -> bool:
  if handler_type is None:
    return True  # a bare except
  names = [e.id for e in (handler_type.elts if isinstance(handler_type, ast.Tuple)
                          else [handler_type]) if isinstance(e, ast.Name)]
  return bool({"ImportError", "ModuleNotFoundError", "Exception", "BaseException"} & set(names))


def test_keras_imports_matplotlib_only_where_import_errors_are_caught():
  found = _keras_matplotlib_imports()
  assert found, ("Keras no longer imports matplotlib when it loads: startup.skip_plotting_imports "
                 "saves nothing now; remove it")
  unguarded = [f"{path}:{line}" for path, line, guarded in found if not guarded]
  assert not unguarded, ("Keras imports matplotlib without catching ImportError, so "
                         "startup.skip_plotting_imports would break `import tensorflow`: "
                         + ", ".join(unguarded))


_PLOTTING = """
import json, sys
if sys.argv[1] == "blocked":
  from trainer import startup
  startup.skip_plotting_imports()
import tensorflow as tf, keras
print(json.dumps(sorted(m for m, v in sys.modules.items()
                        if v is not None and m.split(".")[0] == "matplotlib")))
"""


@pytest.mark.slow
def test_tensorflow_loads_without_matplotlib_and_would_load_it_otherwise():
  # On sys.path: conftest.py keeps matplotlib out of this process as the trainer does.
  if importlib.machinery.PathFinder.find_spec("matplotlib") is None:
    pytest.skip("matplotlib is not installed: there is nothing to keep out")
  blocked = _python(_PLOTTING, "blocked", timeout=180)
  assert blocked.returncode == 0, blocked.stderr[-3000:]
  assert json.loads(blocked.stdout.splitlines()[-1]) == []
  free = _python(_PLOTTING, "free", timeout=180)
  assert free.returncode == 0, free.stderr[-3000:]
  assert "matplotlib.pyplot" in json.loads(free.stdout.splitlines()[-1]), (
      "`import tensorflow` no longer loads matplotlib: skip_plotting_imports saves nothing now")


# ---- trainer/data/tfds_metadata.py: TFDS's on-disk layout, else builder_from_directory ----

def test_tfds_still_writes_the_layout_tfds_metadata_reads():
  """The names trainer/data/tfds_metadata.py expects in features.json and the shard file
  template it builds names from; tests/tfds_metadata_test.py compares a whole dataset opened
  both ways."""
  import tensorflow_datasets as tfds
  from tensorflow_datasets.core import naming
  expected = {
      tfds.features.FeaturesDict: "tensorflow_datasets.core.features.features_dict.FeaturesDict",
      tfds.features.Image: "tensorflow_datasets.core.features.image_feature.Image",
      tfds.features.ClassLabel:
          "tensorflow_datasets.core.features.class_label_feature.ClassLabel"}
  for cls, name in expected.items():
    assert f"{cls.__module__}.{cls.__qualname__}" == name, (
        f"TFDS moved {name}: prepared datasets now name it otherwise in features.json, so "
        "tfds_metadata declines them and every run imports TFDS (update its names)")
  assert naming.DEFAULT_FILENAME_TEMPLATE == "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}", (
      "TFDS names its shard files otherwise now: update tfds_metadata's template")
  assert callable(tfds.builder_from_directory)  # the fallback


# ---- trainer/logs.py load_tensorflow: TensorFlow's native start-up notices ----

_RAW = """
import sys
import tensorflow as tf
tf.config.list_physical_devices("GPU")
"""


@pytest.mark.slow
def test_tensorflows_native_start_up_lines_are_all_recognised():
  """Every line TensorFlow writes to stderr while it loads is one load_tensorflow knows to hold
  back, so the log is ours from its first line; through load_tensorflow nothing is left."""
  env = child_env(TF_ENABLE_ONEDNN_OPTS="1", TF_CPP_MIN_LOG_LEVEL="1")
  raw = _python(_RAW, env=env, timeout=180)
  assert raw.returncode == 0, raw.stderr[-3000:]
  no_driver = not any(n.startswith("nvidia") and n[6:].isdigit() for n in os.listdir("/dev"))
  assert logs.native_lines_to_keep(raw.stderr, no_driver) == [], (
      "TensorFlow writes start-up lines that trainer/logs.py does not recognise (its format "
      "changed?): they now show in every run's log:\n" + raw.stderr)
  quiet = _python("from trainer import logs; logs.load_tensorflow(0)", env=env, timeout=180)
  assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr[-3000:]
