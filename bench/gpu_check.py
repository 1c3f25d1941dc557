"""`make gpu-check`: train MNIST with each GPU path on this machine and print what was measured.

  python -m bench.gpu_check [--out_dir=runs/gpu-check] [--budget_s=420] [--min_accuracy=0.98]

Where no NVIDIA GPU is usable (no nvidia-smi, none listed by it, CUDA_VISIBLE_DEVICES hiding
them all, or TensorFlow seeing none) it exits 2 with one line on stderr; without nvidia-smi it
decides before TensorFlow is ever loaded. Otherwise every step below is a fresh process with its
own timeout, all inside --budget_s (the default keeps the whole check under 8 minutes):

  setup     the GPUs nvidia-smi and TensorFlow see (TensorFlow's CUDA/cuDNN build), and MNIST
            prepared from the vendored files into OUT_DIR/tfds (no network needed)
  mirrored  MirroredStrategy over all GPUs, NCCL all-reduce (--collective_implementation=nccl),
            float32
  mixed     the same with --precision=mixed: mixed_float16 with dynamic loss scaling
  xla       the same in float32 with --xla (the log must show XLA compiling)
  workers   2 workers on this host through trainer.launcher, MultiWorkerMirroredStrategy with
            NCCL, each worker pinned to its own GPUs (see _pinned_worker_exec); with one GPU both
            share it and all-reduce with RING instead, as NCCL refuses two ranks on one GPU
  export    the SavedModels the runs exported, through their serving signature, on the 10,000
            MNIST test digits

Each training run must exit 0, write metrics.json with the expected strategy, replica count and
precision, log the expected all-reduce, and reach --min_accuracy; images/s is metrics.json's
train_images_per_sec (steady state: the first chunk of steps, with tracing, is left out). A
summary table is printed last and written with the raw records to OUT_DIR/gpu_check.json.
Exit codes: 0 every step passed; 1 a step failed (the table says which and why); 2 no usable
GPU, or bad flags.
"""

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time

from absl import app
from absl import flags

from bench import procs

ROOT = procs.ROOT
EXIT_FAILED = 1
EXIT_NO_GPU = 2
# The recipe of `make train` (1 epoch at 256): its CPU accuracy is 99.1-99.3% (README).
BASE_BATCH = 256
WORKERS = 2
NVIDIA_SMI_TIMEOUT_S = 10.0
# Set by the `workers` step for the processes trainer.launcher starts: one CUDA_VISIBLE_DEVICES
# value per worker, separated by ";" (see _pinned_worker_exec).
WORKER_GPUS_ENV = "GPU_CHECK_WORKER_GPUS"
RESULT_TAG = "GPU_CHECK_RESULT"
# After a timeout: SIGTERM, then this long before SIGKILL (the launcher stops its workers within
# LAUNCHER_GRACE_S of its own SIGTERM).
KILL_GRACE_S = 20.0
LAUNCHER_GRACE_S = 10.0
# TensorFlow logs this once per process when it compiles a cluster with XLA (tensorflow/compiler/
# jit/device_compiler.h; the text is in TF 2.21's libtensorflow_cc.so.2), at INFO level, so the
# xla run keeps TF_CPP_MIN_LOG_LEVEL=0.
XLA_COMPILED = "Compiled cluster using XLA"
LOSS_SCALED = "loss scaled dynamically by LossScaleOptimizer"  # trainer/step.py's log line
PROBE_WHAT = {"setup": "GPUs TensorFlow sees; MNIST prepared from the vendored files",
              "export": "exports on the 10,000 MNIST test digits (serving signature)"}

FLAGS = flags.FLAGS


def main(argv) -> int:
  if FLAGS.internal == "worker_launcher":
    return _launch_pinned_workers(argv[1:])
  if len(argv) > 1:
    _refuse(f"unexpected arguments {argv[1:]}: the check takes only its flags (see --help).")
  if FLAGS.internal:
    return _PROBES[FLAGS.internal](argv[1:])
  reason = no_gpu_reason(shutil.which("nvidia-smi"), os.environ)
  if reason:
    _refuse(reason)
  return run_check(os.path.abspath(FLAGS.out_dir), FLAGS.budget_s, FLAGS.min_accuracy)


def _refuse(reason: str) -> None:
  sys.stderr.write(f"gpu-check: {reason}\n")
  sys.exit(EXIT_NO_GPU)


# ---- Is there a GPU? (no TensorFlow) ----

def no_gpu_reason(smi: str, environ) -> str:
  """Why this machine cannot run the check, or "" when nvidia-smi lists a visible GPU."""
  if not smi:
    return ("no NVIDIA GPU here: nvidia-smi is not on PATH. Run `make gpu-check` on a machine "
            "with NVIDIA GPUs and their driver.")
  listing = _nvidia_smi([smi, "-L"])
  if listing is None:
    return (f"{smi} -L failed or did not answer within {NVIDIA_SMI_TIMEOUT_S:.0f} s: the NVIDIA "
            "driver is not working; `nvidia-smi` shows why.")
  if not parse_smi_list(listing):
    return f"no NVIDIA GPU here: `{smi} -L` lists none."
  # trainer/runtime/gpu.py's reading of CUDA_VISIBLE_DEVICES: "" or a leading -1 hides every GPU.
  from trainer.runtime import gpu as gpu_lib  # no TensorFlow: only the standard library
  if gpu_lib.cpu_on_purpose(environ):
    return (f"CUDA_VISIBLE_DEVICES={environ['CUDA_VISIBLE_DEVICES']!r} hides every GPU: unset "
            "it, or list the GPUs to check.")
  return ""


def _nvidia_smi(argv):
  try:
    result = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                            timeout=NVIDIA_SMI_TIMEOUT_S)
  except (OSError, subprocess.TimeoutExpired):
    return None
  return result.stdout if result.returncode == 0 else None


def parse_smi_list(text: str) -> list:
  """`nvidia-smi -L` lines ("GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-...)") as GPU names."""
  names = []
  for line in text.splitlines():
    if line.startswith("GPU ") and ":" in line:
      names.append(line.split(":", 1)[1].split(" (UUID")[0].strip())
  return names


def parse_smi_query(text: str) -> list:
  """`nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader,
  nounits` as [{"index", "name", "memory_mib", "driver"}]; lines that do not parse are skipped."""
  gpus = []
  for row in csv.reader(text.splitlines(), skipinitialspace=True):
    if len(row) != 4:
      continue
    index, name, memory, driver = (field.strip() for field in row)
    gpus.append({"index": index, "name": name,
                 "memory_mib": int(memory) if memory.isdigit() else None, "driver": driver})
  return gpus


# ---- The plan: pure functions of the GPU count ----

def batch_for(replicas: int, base: int = BASE_BATCH) -> int:
  """The smallest multiple of `replicas` not below `base`: the global batch must divide evenly."""
  return -(-base // replicas) * replicas


def visible_gpu_ids(environ, count: int) -> list:
  """CUDA_VISIBLE_DEVICES entries of the `count` GPUs TensorFlow sees, or their CUDA indexes."""
  listed = [v.strip() for v in environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
  if listed:
    return listed[:count]
  return [str(i) for i in range(count)]


def worker_slices(gpu_ids: list, workers: int = WORKERS) -> tuple:
  """(one CUDA_VISIBLE_DEVICES value per worker, all-reduce, note) for `workers` processes.

  Each worker gets its own len(gpu_ids) // workers GPUs: trainer.launcher gives every worker the
  same environment, and MultiWorkerMirroredStrategy in each would take every GPU it sees, so
  two ranks of one NCCL communicator would sit on the same GPU, which NCCL refuses ("Duplicate
  GPU detected", ncclInvalidUsage: NVIDIA/nccl src/init.cc). With fewer GPUs than workers they
  all share the first and all-reduce with RING.
  """
  per_worker = len(gpu_ids) // workers
  if per_worker:
    slices = [",".join(gpu_ids[i * per_worker:(i + 1) * per_worker]) for i in range(workers)]
    return slices, "nccl", ""
  return ([gpu_ids[0]] * workers, "ring",
          f"{len(gpu_ids)} GPU for {workers} workers: they share it, and NCCL refuses two ranks "
          "on one GPU, so the all-reduce is RING; NCCL between workers needs 2+ GPUs")


def plan(gpu_ids: list, out_dir: str) -> list:
  """The training runs: name, what, module args, expectations."""
  gpus = len(gpu_ids)
  data = os.path.join(out_dir, "tfds")
  common = [f"--data_dir={data}", "--require_gpu", "--epochs=1"]
  mirrored = [*common, "--strategy=mirrored", "--collective_implementation=nccl",
              f"--global_batch_size={batch_for(gpus)}"]
  nccl_line = f"All-reduce: NCCL (NcclAllReduce) across {gpus} GPUs"
  runs = [
      {"name": "mirrored", "what": f"MirroredStrategy, {gpus} GPU(s), NCCL, float32",
       "args": [*mirrored, "--precision=float32"], "strategy": "mirrored", "replicas": gpus,
       "precision": "float32", "log_lines": [nccl_line]},
      {"name": "mixed", "what": "the same, --precision=mixed (float16, loss scaling)",
       "args": [*mirrored, "--precision=mixed"], "strategy": "mirrored", "replicas": gpus,
       "precision": "mixed_float16", "log_lines": [nccl_line, LOSS_SCALED]},
      {"name": "xla", "what": "the same, float32 with --xla",
       "args": [*mirrored, "--precision=float32", "--xla"], "strategy": "mirrored",
       "replicas": gpus, "precision": "float32", "log_lines": [nccl_line, XLA_COMPILED]},
  ]
  if gpus == 1:
    for run in runs:
      run["note"] = "1 GPU: nothing to all-reduce between devices, so NCCL is not exercised"
  slices, collective, note = worker_slices(gpu_ids)
  per_worker = len(slices[0].split(","))
  replicas = WORKERS * per_worker
  runs.append(
      {"name": "workers",
       "what": f"{WORKERS} workers (trainer.launcher), {per_worker} GPU(s) each, "
               f"MultiWorkerMirroredStrategy, {collective.upper()}",
       "args": [*common, "--strategy=multi_worker_mirrored",
                f"--collective_implementation={collective}", "--precision=float32",
                f"--global_batch_size={batch_for(replicas)}"],
       "strategy": "multi_worker_mirrored", "replicas": replicas, "precision": "float32",
       "log_lines": [f"All-reduce: {collective.upper()} between workers"],
       "worker_gpus": slices, "note": note})
  for run in runs:
    run["model_dir"] = os.path.join(out_dir, run["name"])
    run["args"].append(f"--model_dir={run['model_dir']}")
  return runs


# ---- Verdicts and the report: pure functions of what the runs left ----

def check_run(run: dict, returncode, metrics, log: str, min_accuracy: float) -> str:
  """"" when the run did what it should, else why not (one line)."""
  if returncode == "timeout":
    return f"timed out after {run.get('timeout_s', 0):.0f} s"
  if returncode != 0:
    return f"exit {returncode}: {procs.last_line(log)}"
  if not metrics:
    return f"no metrics.json in {run['model_dir']}"
  expected = {"strategy": run["strategy"], "num_replicas": run["replicas"],
              "precision": run["precision"]}
  for key, want in expected.items():
    if metrics.get(key) != want:
      return f"metrics.json {key}={metrics.get(key)!r}, expected {want!r}"
  for line in run["log_lines"]:
    if line not in log:
      return f"the log lacks {line!r}"
  if not metrics.get("train_images_per_sec", 0) > 0:
    return "metrics.json has no steady-state images/s (too few chunks of steps?)"
  accuracy = metrics.get("test_accuracy", 0.0)
  if accuracy < min_accuracy:
    return f"test_accuracy {accuracy:.4f} < --min_accuracy={min_accuracy}"
  return ""


def check_exports(exports: dict, records: list, min_accuracy: float) -> str:
  """The export probe's accuracies against each run's own test_accuracy: "" or why not."""
  problems = []
  for record in records:
    if not record.get("ok") or record["name"] not in exports:
      continue
    accuracy = exports[record["name"]]
    trained = record["metrics"]["test_accuracy"]
    # The export holds the same float32 weights the chief evaluated: the same answers, up to
    # the order of floating-point sums.
    if accuracy < min_accuracy or abs(accuracy - trained) > 0.005:
      problems.append(f"{record['name']}: export {accuracy:.4f} vs trained {trained:.4f}")
  return "; ".join(problems)


def table(headers, rows) -> str:
  cells = [[str(c) for c in headers]] + [[str(c) for c in row] for row in rows]
  widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
  lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
  lines.insert(1, "  ".join("-" * w for w in widths))
  return "\n".join(lines)


def summary(devices: dict, records: list) -> str:
  """The final report: devices, then one row per step."""
  lines = []
  build = devices.get("build", {})
  lines.append(f"TensorFlow {devices.get('tensorflow', '?')} (CUDA {build.get('cuda_version')}, "
               f"cuDNN {build.get('cudnn_version')})")
  for gpu in devices.get("smi", []):
    lines.append(f"nvidia-smi GPU {gpu['index']}: {gpu['name']}, {gpu['memory_mib']} MiB, "
                 f"driver {gpu['driver']}")
  for gpu in devices.get("tf_gpus", []):
    lines.append(f"TensorFlow {gpu['name']}: {gpu.get('device_name')}, compute capability "
                 f"{gpu.get('compute_capability')}")
  rows = []
  for r in records:
    m = r.get("metrics") or {}
    rate = m.get("train_images_per_sec")
    accuracy = r.get("export_accuracy", m.get("test_accuracy"))
    rows.append([r["name"], "PASS" if r.get("ok") else "FAIL",
                 f"{rate:,.0f}" if rate else "-",
                 f"{accuracy:.4f}" if accuracy is not None else "-",
                 m.get("num_replicas", "-"), m.get("precision", "-"),
                 f"{r['wall_s']:.0f}" if r.get("wall_s") is not None else "-",
                 r.get("reason") or "; ".join(t for t in (r.get("what"), r.get("note")) if t)])
  lines += ["", table(["step", "result", "images/s", "test acc", "replicas", "precision",
                       "wall s", "what / why"], rows)]
  return "\n".join(lines)


def exit_code(records: list) -> int:
  return 0 if records and all(r.get("ok") for r in records) else EXIT_FAILED


# ---- Running it ----

def run_check(out_dir: str, budget_s: float, min_accuracy: float) -> int:
  deadline = time.monotonic() + budget_s
  os.makedirs(out_dir, exist_ok=True)
  records = []
  setup = _probe_step("setup", ["--internal=setup", f"--data_dir={os.path.join(out_dir, 'tfds')}"],
                      out_dir, deadline, cap_s=150)
  devices = setup.pop("result", None) or {}
  devices["smi"] = parse_smi_query(_nvidia_smi([
      shutil.which("nvidia-smi"), "--query-gpu=index,name,memory.total,driver_version",
      "--format=csv,noheader,nounits"]) or "")
  records.append(setup)
  if setup["ok"] and not devices.get("tf_gpus"):
    _refuse(f"nvidia-smi lists {len(devices['smi'])} GPU(s) but TensorFlow "
            f"{devices.get('tensorflow')} sees none (is_cuda_build="
            f"{devices.get('build', {}).get('is_cuda_build')}): rebuild the venv where "
            "nvidia-smi exists (`make` installs '.[gpu]', TensorFlow's CUDA libraries); "
            f"log: {setup['log_path']}")
  if setup["ok"]:
    gpu_ids = visible_gpu_ids(os.environ, len(devices["tf_gpus"]))
    for run in plan(gpu_ids, out_dir):
      records.append(_train_step(run, out_dir, deadline, min_accuracy))
    records.append(_export_step(records, out_dir, deadline, min_accuracy))
  report = summary(devices, records)
  with open(os.path.join(out_dir, "gpu_check.json"), "w") as f:
    json.dump({"devices": devices, "records": records}, f, indent=2, default=str)
  print(report, flush=True)
  code = exit_code(records)
  print(f"\ngpu-check: {'PASS' if code == 0 else 'FAIL'}; logs and gpu_check.json in {out_dir}",
        flush=True)
  return code


def _remaining(deadline: float, cap_s: float) -> float:
  return min(cap_s, deadline - time.monotonic())


def _not_run(name: str, what: str) -> dict:
  return {"name": name, "what": what, "ok": False,
          "reason": "not run: --budget_s is spent (an earlier step took its time)"}


def _say(message: str) -> None:
  print(f"[gpu-check] {message}", flush=True)


def _probe_step(name: str, args: list, out_dir: str, deadline: float, cap_s: float) -> dict:
  timeout = _remaining(deadline, cap_s)
  if timeout < 10:
    return _not_run(name, PROBE_WHAT[name])
  _say(f"{name}: up to {timeout:.0f} s")
  log_path = os.path.join(out_dir, f"{name}.log")
  code, wall, log = run_process([sys.executable, "-m", "bench.gpu_check", *args],
                                _child_env(), log_path, timeout)
  results = procs.json_lines(log, RESULT_TAG)
  record = {"name": name, "what": PROBE_WHAT[name], "wall_s": wall, "log_path": log_path,
            "result": results[-1] if results else None}
  record["ok"] = code == 0 and bool(results)
  if not record["ok"]:
    record["reason"] = ("timed out" if code == "timeout"
                        else f"exit {code}: {procs.last_line(log)}")
  return record


def _train_step(run: dict, out_dir: str, deadline: float, min_accuracy: float) -> dict:
  run["timeout_s"] = _remaining(deadline, cap_s=180)
  if run["timeout_s"] < 30:
    return _not_run(run["name"], run["what"])
  _say(f"{run['name']}: {run['what']} (up to {run['timeout_s']:.0f} s)")
  procs.fresh_dir(run["model_dir"])
  env = _child_env(TF_CPP_MIN_LOG_LEVEL="0")
  if "worker_gpus" in run:
    # Both workers on one GPU must not each take all its memory (TensorFlow's default).
    env.update({WORKER_GPUS_ENV: ";".join(run["worker_gpus"]),
                "TF_FORCE_GPU_ALLOW_GROWTH": "true"})
    argv = [sys.executable, "-m", "bench.gpu_check", "--internal=worker_launcher", "--",
            *run["args"]]
  else:
    argv = [sys.executable, "-m", "trainer.task", *run["args"]]
  log_path = os.path.join(out_dir, f"{run['name']}.log")
  code, wall, log = run_process(argv, env, log_path, run["timeout_s"])
  metrics = procs.read_json(os.path.join(run["model_dir"], "metrics.json"))
  reason = check_run(run, code, metrics, log, min_accuracy)
  keep = ("test_accuracy", "train_images_per_sec", "num_replicas", "num_workers", "precision",
          "strategy", "train_seconds", "global_step")
  record = {"name": run["name"], "what": run["what"], "ok": not reason, "reason": reason,
            "note": run.get("note", ""), "wall_s": wall, "returncode": code, "argv": argv,
            "log_path": log_path,
            "metrics": {k: metrics[k] for k in keep if k in metrics} if metrics else None}
  _say(f"{run['name']}: {'PASS' if not reason else 'FAIL: ' + reason}")
  return record


def _export_step(records: list, out_dir: str, deadline: float, min_accuracy: float) -> dict:
  dirs = [f"{r['name']}={os.path.join(out_dir, r['name'], 'export')}" for r in records
          if r.get("ok") and r.get("metrics")]
  what = PROBE_WHAT["export"]
  if not dirs:
    return {"name": "export", "what": what, "ok": False, "reason": "no run exported a model"}
  record = _probe_step("export", ["--internal=export_accuracy", f"--exports={','.join(dirs)}"],
                       out_dir, deadline, cap_s=90)
  accuracies = record.pop("result", None) or {}
  if record["ok"]:
    record["reason"] = check_exports(accuracies, records, min_accuracy)
    record["ok"] = not record["reason"]
    record["note"] = ", ".join(f"{k} {v:.4f}" for k, v in accuracies.items())
  record["exports"] = accuracies
  return record


def _child_env(**extra) -> dict:
  env = procs.child_env()
  env.update(extra)
  return env


def run_process(argv: list, env: dict, log_path: str, timeout_s: float) -> tuple:
  """(exit code or "timeout", wall seconds, log text) of argv with its output in log_path.

  The child leads its own process group: after the timeout the group gets SIGTERM (the trainer
  checkpoints and exits 143; trainer.launcher stops its workers, which run in their own
  sessions, within LAUNCHER_GRACE_S), then SIGKILL after KILL_GRACE_S.
  """
  os.makedirs(os.path.dirname(log_path), exist_ok=True)
  started = time.monotonic()
  with open(log_path, "w") as log:
    proc = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    try:
      code = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
      code = "timeout"
      _signal_group(proc, signal.SIGTERM)
      try:
        proc.wait(timeout=KILL_GRACE_S)
      except subprocess.TimeoutExpired:
        _signal_group(proc, signal.SIGKILL)
        proc.wait()
  with open(log_path, errors="replace") as f:
    return code, round(time.monotonic() - started, 1), f.read()


def _signal_group(proc, signum) -> None:
  try:
    os.killpg(proc.pid, signum)
  except ProcessLookupError:
    pass


# ---- What runs in the child processes ----

def _setup_probe(argv) -> int:
  """The GPUs TensorFlow sees and its CUDA build; MNIST prepared into --data_dir."""
  del argv
  import tensorflow as tf
  from trainer import data
  gpus = tf.config.list_physical_devices("GPU")
  details = []
  for gpu in gpus:
    info = tf.config.experimental.get_device_details(gpu)
    capability = info.get("compute_capability")
    details.append({"name": gpu.name, "device_name": info.get("device_name"),
                    "compute_capability": ".".join(map(str, capability)) if capability else None})
  build = dict(tf.sysconfig.get_build_info())
  result = {"tensorflow": tf.__version__, "tf_gpus": details,
            "build": {k: build.get(k) for k in ("is_cuda_build", "cuda_version",
                                                  "cudnn_version")}}
  if gpus:  # Without GPUs the check stops here; no need to prepare data.
    data.prepare("mnist", FLAGS.data_dir)
  print(f"{RESULT_TAG} {json.dumps(result)}", flush=True)
  return 0


def _export_accuracy_probe(argv) -> int:
  """Each NAME=EXPORT_DIR of --exports: accuracy of its serving signature on the test split."""
  del argv
  import numpy as np
  import tensorflow as tf
  from trainer import data
  source = data.vendored_mnist_dir()
  images = data.read_idx(os.path.join(source, "t10k-images-idx3-ubyte.gz"))[..., None]
  labels = data.read_idx(os.path.join(source, "t10k-labels-idx1-ubyte.gz"))
  result = {}
  for item in FLAGS.exports:
    name, export_dir = item.split("=", 1)
    serve = tf.saved_model.load(export_dir).signatures["serving_default"]
    classes = np.concatenate([serve(images=tf.constant(images[i:i + 1000]))["classes"].numpy()
                              for i in range(0, len(images), 1000)])
    result[name] = float(np.mean(classes == labels))
  print(f"{RESULT_TAG} {json.dumps(result)}", flush=True)
  return 0


def _launch_pinned_workers(trainer_args) -> int:
  """trainer.launcher's job of WORKERS workers, each started through _pinned_worker_exec."""
  from trainer import launcher
  return launcher.launch(WORKERS, trainer_args, threads_per_worker=0,
                         shutdown_grace_s=LAUNCHER_GRACE_S, module="bench.gpu_check")


def pinned_worker_gpus(environ) -> str:
  """This worker's CUDA_VISIBLE_DEVICES: its TF_CONFIG task index picks from WORKER_GPUS_ENV."""
  slices = environ[WORKER_GPUS_ENV].split(";")
  index = json.loads(environ["TF_CONFIG"])["task"]["index"]
  return slices[index]


def _pinned_worker_exec() -> None:
  """A worker of the `workers` step: pinned to its GPUs, then replaced by trainer.task (exec
  keeps the pid, so the launcher's signals reach the trainer)."""
  os.environ["CUDA_VISIBLE_DEVICES"] = pinned_worker_gpus(os.environ)
  del os.environ[WORKER_GPUS_ENV]
  print(f"gpu-check: this worker runs with CUDA_VISIBLE_DEVICES="
        f"{os.environ['CUDA_VISIBLE_DEVICES']}", flush=True)
  os.execv(sys.executable, [sys.executable, "-m", "trainer.task", *sys.argv[1:]])


_PROBES = {"setup": _setup_probe, "export_accuracy": _export_accuracy_probe}


def _define_flags() -> None:
  """Flags exist only when this module is the program (tests import it)."""
  flags.DEFINE_string("out_dir", os.path.join(ROOT, "runs", "gpu-check"),
                      "Logs, model dirs, prepared MNIST (kept between checks) and "
                      "gpu_check.json.")
  flags.DEFINE_float("budget_s", 420.0, "All steps together stop after this long; each also has "
                     "its own timeout. The default keeps `make gpu-check` under 8 minutes.")
  flags.DEFINE_float("min_accuracy", 0.98, "Test accuracy each run and export must reach.")
  flags.DEFINE_enum("internal", "", ["", "setup", "export_accuracy", "worker_launcher"],
                    "The check's own child processes; not for use by hand.")
  flags.DEFINE_string("data_dir", "", "--internal=setup: where MNIST is prepared.")
  flags.DEFINE_list("exports", [], "--internal=export_accuracy: NAME=EXPORT_DIR items.")


if __name__ == "__main__":
  if os.environ.get(WORKER_GPUS_ENV) and os.environ.get("TF_CONFIG"):
    _pinned_worker_exec()
  from trainer import cli
  _define_flags()
  app.run(main, flags_parser=cli.parse_flags)
