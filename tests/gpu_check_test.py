"""`make gpu-check` (bench/gpu_check.py) without a GPU: it refuses with exit 2 and one line, before
TensorFlow loads where nvidia-smi is missing; its plan, verdicts and report are pure functions;
and (slow) its checks hold on the trainer's real metrics.json, logs and export from CPU runs."""

import json
import os
import stat
import subprocess
import sys
import time

import pytest

from bench import gpu_check
import conftest

FAKE_SMI_LIST = "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-5a1e2b3c-0000-0000-0000-000000000000)"
FAKE_SMI_QUERY = "0, NVIDIA H100 80GB HBM3, 81559, 550.54.15"


def fake_smi(directory, listing: str = FAKE_SMI_LIST, code: int = 0) -> str:
  """An nvidia-smi that prints `listing` for -L and one --query-gpu row otherwise."""
  directory.mkdir(exist_ok=True)
  path = directory / "nvidia-smi"
  path.write_text(f"#!/bin/sh\nif [ \"$1\" = -L ]; then printf '%s\\n' '{listing}'; else "
                  f"echo '{FAKE_SMI_QUERY}'; fi\nexit {code}\n")
  path.chmod(path.stat().st_mode | stat.S_IXUSR)
  return str(directory)


def refusal(**env):
  """The check in a child that cannot import TensorFlow; returns (exit code, output lines)."""
  result = conftest.run_without_tf("bench.gpu_check", **env)
  return result.returncode, result.stdout.splitlines()


# ---- Refusing where no GPU is usable: exit 2, one line, no TensorFlow ----

def test_without_nvidia_smi_it_exits_2_with_one_line_before_tensorflow(tmp_path):
  empty = tmp_path / "bin"
  empty.mkdir()
  code, lines = refusal(PATH=str(empty))
  assert code == 2
  assert lines == ["gpu-check: no NVIDIA GPU here: nvidia-smi is not on PATH. Run `make "
                   "gpu-check` on a machine with NVIDIA GPUs and their driver."]


@pytest.mark.parametrize("listing, code, env, message", [
    ("No devices were found", 0, {}, "lists none"),
    ("", 9, {}, "the NVIDIA driver is not working"),
    (FAKE_SMI_LIST, 0, {"CUDA_VISIBLE_DEVICES": "-1"}, "CUDA_VISIBLE_DEVICES='-1' hides every GPU"),
    (FAKE_SMI_LIST, 0, {"CUDA_VISIBLE_DEVICES": ""}, "hides every GPU"),
])
def test_nvidia_smi_without_a_visible_gpu_is_refused_before_tensorflow(tmp_path, listing, code,
                                                                       env, message):
  code_seen, lines = refusal(PATH=fake_smi(tmp_path / "bin", listing, code), **env)
  assert code_seen == 2
  assert len(lines) == 1 and lines[0].startswith("gpu-check: ") and message in lines[0], lines


def test_stray_arguments_and_unknown_flags_exit_2(tmp_path):
  result = conftest.run_without_tf("bench.gpu_check", "now")
  assert result.returncode == 2 and "unexpected arguments ['now']" in result.stdout
  result = conftest.run_without_tf("bench.gpu_check", "--gpus=2")
  assert result.returncode == 2 and "Unknown command line flag 'gpus'" in result.stdout


# ---- nvidia-smi's output ----

def test_nvidia_smi_listing_and_query_parse():
  assert gpu_check.parse_smi_list(f"{FAKE_SMI_LIST}\nGPU 1: Tesla T4 (UUID: GPU-1)\n") == [
      "NVIDIA H100 80GB HBM3", "Tesla T4"]
  assert gpu_check.parse_smi_list("No devices were found\n") == []
  assert gpu_check.parse_smi_query(f"{FAKE_SMI_QUERY}\n1, Tesla T4, [N/A], 535.1\nbroken\n") == [
      {"index": "0", "name": "NVIDIA H100 80GB HBM3", "memory_mib": 81559, "driver": "550.54.15"},
      {"index": "1", "name": "Tesla T4", "memory_mib": None, "driver": "535.1"}]


# ---- The plan for 1, 2, 3 and 8 GPUs ----

@pytest.mark.parametrize("replicas, batch", [(1, 256), (2, 256), (3, 258), (6, 258), (8, 256)])
def test_the_global_batch_divides_by_the_replicas(replicas, batch):
  assert gpu_check.batch_for(replicas) == batch


def test_visible_gpu_ids_follow_cuda_visible_devices():
  assert gpu_check.visible_gpu_ids({}, 2) == ["0", "1"]
  assert gpu_check.visible_gpu_ids({"CUDA_VISIBLE_DEVICES": "2, 3,5"}, 3) == ["2", "3", "5"]
  assert gpu_check.visible_gpu_ids({"CUDA_VISIBLE_DEVICES": "GPU-a,GPU-b"}, 1) == ["GPU-a"]


@pytest.mark.parametrize("ids, slices, collective", [
    (["0"], ["0", "0"], "ring"),  # NCCL refuses two ranks on one GPU
    (["0", "1"], ["0", "1"], "nccl"),
    (["0", "1", "2"], ["0", "1"], "nccl"),
    ([str(i) for i in range(8)], ["0,1,2,3", "4,5,6,7"], "nccl"),
])
def test_each_worker_gets_its_own_gpus(ids, slices, collective):
  got_slices, got_collective, note = gpu_check.worker_slices(ids)
  assert (got_slices, got_collective) == (slices, collective)
  assert bool(note) == (collective == "ring")


def test_pinned_workers_pick_their_slice_by_task_index():
  environ = {gpu_check.WORKER_GPUS_ENV: "0,1;2,3"}
  for index, gpus in ((0, "0,1"), (1, "2,3")):
    environ["TF_CONFIG"] = json.dumps({"cluster": {"worker": ["a:1", "b:2"]},
                                       "task": {"type": "worker", "index": index}})
    assert gpu_check.pinned_worker_gpus(environ) == gpus


@pytest.mark.parametrize("ids", [["0"], ["0", "1"], [str(i) for i in range(8)]])
def test_plan_runs_every_gpu_path(tmp_path, ids):
  runs = {r["name"]: r for r in gpu_check.plan(ids, str(tmp_path))}
  assert list(runs) == ["mirrored", "mixed", "xla", "workers"]
  gpus = len(ids)
  for name in ("mirrored", "mixed", "xla"):
    args = runs[name]["args"]
    assert "--strategy=mirrored" in args and "--collective_implementation=nccl" in args
    assert runs[name]["replicas"] == gpus
    assert f"All-reduce: NCCL (NcclAllReduce) across {gpus} GPUs" in runs[name]["log_lines"]
  assert "--precision=mixed" in runs["mixed"]["args"]
  assert runs["mixed"]["precision"] == "mixed_float16"
  assert "--xla" in runs["xla"]["args"] and gpu_check.XLA_COMPILED in runs["xla"]["log_lines"]
  workers = runs["workers"]
  assert "--strategy=multi_worker_mirrored" in workers["args"]
  assert workers["replicas"] == 2 * max(1, gpus // 2)
  collective = "ring" if gpus == 1 else "nccl"
  assert f"--collective_implementation={collective}" in workers["args"]
  for run in runs.values():
    batch = int(next(a for a in run["args"] if a.startswith("--global_batch_size="))
                .split("=")[1])
    assert batch % run["replicas"] == 0
    assert f"--model_dir={tmp_path / run['name']}" in run["args"]
    assert f"--data_dir={tmp_path / 'tfds'}" in run["args"]


# ---- Verdicts and the report ----

RUN = {"name": "mixed", "what": "w", "model_dir": "/m", "strategy": "mirrored", "replicas": 2,
       "precision": "mixed_float16", "log_lines": ["NCCL", gpu_check.LOSS_SCALED],
       "timeout_s": 120}
METRICS = {"strategy": "mirrored", "num_replicas": 2, "precision": "mixed_float16",
           "train_images_per_sec": 91234.5, "test_accuracy": 0.9912}
LOG = f"All-reduce: NCCL ...\nPrecision policy mixed_float16, {gpu_check.LOSS_SCALED}\n"


@pytest.mark.parametrize("code, metrics, log, reason", [
    (0, METRICS, LOG, ""),
    ("timeout", None, "", "timed out after 120 s"),
    (143, None, "a\nFATAL lost a peer\n", "exit 143: FATAL lost a peer"),
    (0, None, LOG, "no metrics.json in /m"),
    (0, {**METRICS, "precision": "float32"}, LOG, "precision='float32', expected 'mixed_float16'"),
    (0, {**METRICS, "num_replicas": 1}, LOG, "num_replicas=1, expected 2"),
    (0, METRICS, "All-reduce: NCCL", "the log lacks 'loss scaled dynamically"),
    (0, {**METRICS, "train_images_per_sec": 0.0}, LOG, "no steady-state images/s"),
    (0, {**METRICS, "test_accuracy": 0.5}, LOG, "test_accuracy 0.5000 < --min_accuracy=0.98"),
])
def test_check_run_says_what_is_wrong(code, metrics, log, reason):
  got = gpu_check.check_run(RUN, code, metrics, log, 0.98)
  assert (got == "") if not reason else (reason in got), got


def test_exports_must_answer_like_the_trained_model():
  records = [{"name": "mirrored", "ok": True, "metrics": {"test_accuracy": 0.991}},
             {"name": "mixed", "ok": True, "metrics": {"test_accuracy": 0.990}},
             {"name": "xla", "ok": False, "metrics": None}]
  assert gpu_check.check_exports({"mirrored": 0.9912, "mixed": 0.9899}, records, 0.98) == ""
  assert gpu_check.check_exports({"mirrored": 0.9912, "mixed": 0.1135}, records, 0.98) == (
      "mixed: export 0.1135 vs trained 0.9900")


def test_summary_names_the_devices_and_every_step():
  devices = {"tensorflow": "2.21.0", "build": {"cuda_version": "12.5.1", "cudnn_version": "9"},
             "smi": gpu_check.parse_smi_query(FAKE_SMI_QUERY),
             "tf_gpus": [{"name": "/physical_device:GPU:0", "device_name": "NVIDIA H100 80GB HBM3",
                          "compute_capability": "9.0"}]}
  records = [{"name": "setup", "ok": True, "wall_s": 21.0, "what": "probe"},
             {"name": "mixed", "ok": True, "wall_s": 30.2, "metrics": METRICS, "what": "float16"},
             {"name": "workers", "ok": False, "reason": "exit 2: FATAL bad", "metrics": None}]
  text = gpu_check.summary(devices, records)
  assert "TensorFlow 2.21.0 (CUDA 12.5.1, cuDNN 9)" in text
  assert "nvidia-smi GPU 0: NVIDIA H100 80GB HBM3, 81559 MiB, driver 550.54.15" in text
  assert "compute capability 9.0" in text
  rows = {line.split()[0]: line for line in text.splitlines()[4:] if line.strip()}
  assert rows["mixed"].split()[1:5] == ["PASS", "91,234", "0.9912", "2"]
  assert "FAIL" in rows["workers"] and "exit 2: FATAL bad" in rows["workers"]
  assert gpu_check.exit_code(records) == 1
  assert gpu_check.exit_code(records[:2]) == 0
  assert gpu_check.exit_code([]) == 1


def test_a_run_past_its_timeout_is_stopped(tmp_path):
  tic = time.monotonic()
  code, wall, _ = gpu_check.run_process(
      [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(120)"],
      dict(os.environ), str(tmp_path / "sleep.log"), timeout_s=2)
  assert code == "timeout" and 2 <= wall < 10 and time.monotonic() - tic < 10
  assert (tmp_path / "sleep.log").read_text() == "started\n"


# ---- Slow: the checks on the trainer's real outputs, from CPU runs ----

@pytest.mark.slow
def test_tensorflow_seeing_no_gpu_is_refused_with_one_line(tmp_path):
  """nvidia-smi lists a GPU (a stand-in), but this TensorFlow, on a CPU machine, sees none."""
  env = conftest.child_env(PATH=fake_smi(tmp_path / "bin") + os.pathsep + os.environ["PATH"])
  result = subprocess.run(
      [sys.executable, "-m", "bench.gpu_check", f"--out_dir={tmp_path / 'out'}"], env=env,
      cwd=conftest.ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 2, result.stdout + result.stderr
  [line] = result.stderr.splitlines()
  assert line.startswith("gpu-check: nvidia-smi lists 1 GPU(s) but TensorFlow ")
  assert "sees none" in line and "'.[gpu]'" in line
  assert not (tmp_path / "out" / "tfds").exists(), "no data prepared for a check that cannot run"


@pytest.mark.slow
def test_float16_loss_scaling_xla_and_the_export_are_recognised_in_a_real_run(tfds_dir, tmp_path):
  """A CPU stand-in for the mixed and xla runs: the trainer's own float16 path (the tests'
  policy override), XLA and the export, judged by the check's own functions."""
  model_dir = tmp_path / "mixed"
  args = conftest.tiny_flags(str(model_dir), tfds_dir, eval_examples=0, train_steps=30)
  env = conftest.child_env(TF_CPP_MIN_LOG_LEVEL="0",
                           TRAINER_MIXED_PRECISION_POLICY="mixed_float16")
  code, _, log = gpu_check.run_process(
      [sys.executable, "-m", "trainer.task", *args, "--strategy=mirrored", "--num_cpu_devices=2",
       "--precision=mixed", "--xla"], env, str(tmp_path / "mixed.log"), timeout_s=300)
  metrics = json.loads((model_dir / "metrics.json").read_text())
  run = {"name": "mixed", "model_dir": str(model_dir), "strategy": "mirrored", "replicas": 2,
         "precision": "mixed_float16", "log_lines": [gpu_check.LOSS_SCALED, gpu_check.XLA_COMPILED]}
  assert gpu_check.check_run(run, code, metrics, log, min_accuracy=0.3) == "", log[-3000:]
  result = conftest.run_module("bench.gpu_check", "--internal=export_accuracy",
                               f"--exports=mixed={model_dir / 'export'}", timeout=300)
  assert result.returncode == 0, result.stdout[-3000:]
  [exports] = [json.loads(line.split(" ", 1)[1]) for line in result.stdout.splitlines()
               if line.startswith(gpu_check.RESULT_TAG)]
  record = {"name": "mixed", "ok": True, "metrics": metrics}
  assert gpu_check.check_exports(exports, [record], min_accuracy=0.3) == "", (exports, metrics)


@pytest.mark.slow
def test_two_pinned_workers_train_through_the_launcher(tfds_dir, tmp_path):
  """The workers step's path: trainer.launcher starts each worker through the check, which pins
  it to its GPU slice (here CUDA_VISIBLE_DEVICES on a CPU machine) and execs trainer.task."""
  model_dir = tmp_path / "workers"
  args = conftest.tiny_flags(str(model_dir), tfds_dir)
  env = conftest.child_env(**{gpu_check.WORKER_GPUS_ENV: "0;1"})
  code, _, log = gpu_check.run_process(
      [sys.executable, "-m", "bench.gpu_check", "--internal=worker_launcher", "--", *args,
       "--strategy=multi_worker_mirrored", "--collective_implementation=ring"], env,
      str(tmp_path / "workers.log"), timeout_s=300)
  assert "[worker:0] gpu-check: this worker runs with CUDA_VISIBLE_DEVICES=0" in log, log
  assert "[worker:1] gpu-check: this worker runs with CUDA_VISIBLE_DEVICES=1" in log, log
  metrics = json.loads((model_dir / "metrics.json").read_text())
  run = {"name": "workers", "model_dir": str(model_dir), "strategy": "multi_worker_mirrored",
         "replicas": 2, "precision": metrics["precision"],
         "log_lines": ["All-reduce: RING between workers"]}
  assert gpu_check.check_run(run, code, metrics, log, min_accuracy=0.3) == "", log[-3000:]
  assert metrics["num_workers"] == 2
