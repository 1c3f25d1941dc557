"""Watchdog, GIL-free deadlines and the SIGTERM backstop, in child processes (they exit hard)."""

import json
import re
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from conftest import ROOT, child_env, tiny_flags
from trainer import errors
from trainer import launcher

# Each script gets a peer that accepts connections and never speaks: alive, but silent.
_PRELUDE = """
import itertools, os, signal, socket, sys, threading, time
from trainer.runtime import preemption
from trainer.runtime import watchdog as watchdog_lib
peer = socket.socket()
peer.bind(("127.0.0.1", 0))
peer.listen(8)
PEERS = [("worker:1", f"127.0.0.1:{peer.getsockname()[1]}")]
START = time.monotonic()

def say(what):
  print(f"{time.monotonic() - START:.2f} {what}", flush=True)
"""


def _run(body, setup="", timeout=60, **env):
  """Runs _PRELUDE, setup and body in a child; returns (exit code, output, seconds)."""
  start = time.monotonic()
  try:
    result = subprocess.run([sys.executable, "-c", _PRELUDE + setup + textwrap.dedent(body)],
                            env=child_env(**env), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, timeout=timeout)
  except subprocess.TimeoutExpired as e:
    pytest.fail(f"still running after {timeout}s: it hangs\n{e.output}")
  return result.returncode, result.stdout, time.monotonic() - start


def test_uninstall_cancels_the_sigterm_backstop():
  # A notebook that handled SIGTERM cleanly must not be force-exited a grace period later.
  code, out, _ = _run("""
      handler = preemption.PreemptionHandler(grace_s=1.0)
      handler.install()
      os.kill(os.getpid(), signal.SIGTERM)
      assert handler.requested.wait(10)
      handler.uninstall()
      time.sleep(2.5)
      say("still alive")
      """)
  assert code == 0, out
  assert "still alive" in out and "FATAL" not in out


def test_sigterm_backstop_still_fires_while_installed():
  code, out, elapsed = _run("""
      handler = preemption.PreemptionHandler(grace_s=1.0)
      handler.install()
      os.kill(os.getpid(), signal.SIGTERM)
      time.sleep(30)
      """)
  assert code == errors.EXIT_RETRYABLE, out
  assert "no clean stop within --preemption_grace_s=1s" in out and elapsed < 20


def test_phase_arms_on_entry_and_disarms_on_exit():
  code, out, _ = _run("""
      watchdog = watchdog_lib.Watchdog(PEERS, 1.0, "worker:0")
      with watchdog.phase("checkpoint"):
        pass
      try:
        with watchdog.phase("checkpoint"):
          raise KeyError("boom")
      except KeyError:
        pass
      time.sleep(2.0)  # disarmed: the watchdog must stay quiet
      say("between phases")
      with watchdog.phase("train"):
        time.sleep(30)
      """)
  assert code == errors.EXIT_RETRYABLE, out
  assert "between phases" in out
  assert re.search(r"FATAL: worker:0 made no progress in phase 'train' for 1s", out), out
  assert "FATAL" not in out.split("between phases")[0]


def test_arm_and_disarm_still_work():
  code, out, _ = _run("""
      watchdog = watchdog_lib.Watchdog(PEERS, 1.0, "worker:0")
      watchdog.arm("final barrier")
      time.sleep(0.2)
      watchdog.disarm()
      time.sleep(2.0)
      say("alive")
      """)
  assert code == 0 and "alive" in out, out


_HOLD_GIL = "sum(itertools.repeat(1, 10**12))  # one C call that never releases the GIL"


def test_gil_holding_phase_exits_143_with_a_message():
  # Without holds_gil the watchdog thread never runs here and the process hangs for good.
  code, out, elapsed = _run(f"""
      watchdog = watchdog_lib.Watchdog(PEERS, 1.0, "worker:0")
      with watchdog.phase("strategy creation", holds_gil=True):
        {_HOLD_GIL}
      """)
  assert code == errors.EXIT_RETRYABLE, out
  assert "FATAL: worker:0 made no progress in phase 'strategy creation' for 1s" in out, out
  assert "none unreachable" in out and f"Exiting {errors.EXIT_RETRYABLE}" in out
  assert elapsed < 20, elapsed


def test_gil_holding_phase_that_ends_in_time_leaves_no_trace():
  code, out, _ = _run("""
      watchdog = watchdog_lib.Watchdog(PEERS, 0.5, "worker:0")
      with watchdog.phase("strategy creation", holds_gil=True):
        time.sleep(0.1)
      time.sleep(3.0)  # past the deadline and the exit timer's _REPORT_S
      say("alive")
      """)
  assert code == 0 and "alive" in out and "FATAL" not in out, out


def test_gil_holding_phase_without_peers_is_a_no_op():
  code, out, _ = _run("""
      watchdog = watchdog_lib.Watchdog([], 0.1, "worker:0")
      with watchdog.phase("strategy creation", holds_gil=True):
        time.sleep(0.5)
      say("alive")
      """)
  assert code == 0 and "alive" in out, out


_FLAKY_UPLOAD = """
from trainer.storage import gcs
failing_until = time.monotonic() + {fail_s}

def upload():
  if time.monotonic() < failing_until:
    raise ConnectionResetError("connection reset by peer")
  return "done"
"""


def test_own_storage_retries_are_not_peer_silence():
  # The chief's upload retries for 2.5s; its watchdog allows 1s of peer silence.
  code, out, _ = _run(setup=_FLAKY_UPLOAD.format(fail_s=2.5), body="""
      watchdog = watchdog_lib.Watchdog(PEERS, 1.0, "worker:0")
      with watchdog.phase("checkpoint"):
        say(gcs.retry(upload, "upload gs://bucket/ckpt-20/x"))
      say("alive")
      """, TRAINER_STORAGE_RETRY_DEADLINE_S=30)
  assert code == 0, out
  assert "done" in out and "alive" in out and "FATAL" not in out


def test_a_timeout_after_slow_storage_says_so():
  code, out, _ = _run(setup=_FLAKY_UPLOAD.format(fail_s=600), body="""
      watchdog = watchdog_lib.Watchdog(PEERS, 1.0, "worker:0")
      with watchdog.phase("checkpoint"):
        try:
          gcs.retry(upload, "upload gs://bucket/ckpt-20/x")
        except Exception as e:
          say(type(e).__name__)
        time.sleep(30)
      """, TRAINER_STORAGE_RETRY_DEADLINE_S=1)
  assert code == errors.EXIT_RETRYABLE, out
  assert "RetryableError" in out
  assert ("storage was slow in this phase (upload gs://bucket/ckpt-20/x was retrying), or a "
          "peer is stuck") in out, out


def test_other_workers_allow_for_the_chiefs_storage_at_startup_and_after_a_checkpoint():
  # Peer silence 0.5s, chief's storage retries up to 1.5s: 2s in the phases where the chief may
  # be preflighting or uploading, 0.5s once a training chunk has shown it is back.
  code, out, _ = _run("""
      watchdog = watchdog_lib.Watchdog(PEERS, 0.5, "worker:1", is_chief=False)
      for name in ("strategy creation", "model initialization", "train", "checkpoint", "train"):
        with watchdog.phase(name):
          time.sleep(0.1 if name == "checkpoint" else 1.2)  # the chief uploads after saving
        say(f"survived {name}")
      with watchdog.phase("train"):
        time.sleep(30)
      """, TRAINER_STORAGE_RETRY_DEADLINE_S=1.5)
  assert code == errors.EXIT_RETRYABLE, out
  survived = re.findall(r"survived (.+)", out)
  assert survived == ["strategy creation", "model initialization", "train", "checkpoint",
                      "train"], out
  assert "in phase 'train' for 1s" in out or "in phase 'train' for 0s" in out, out
  assert "chief" not in out.split("FATAL", 1)[1], "steady state: no excuse for the chief"


def test_a_timeout_after_a_checkpoint_says_the_chief_may_be_uploading():
  code, out, elapsed = _run("""
      watchdog = watchdog_lib.Watchdog(PEERS, 0.5, "worker:1", is_chief=False)
      with watchdog.phase("train"):
        pass
      with watchdog.phase("checkpoint"):
        pass
      say("waiting")
      with watchdog.phase("train"):
        time.sleep(30)
      """, TRAINER_STORAGE_RETRY_DEADLINE_S=1)
  assert code == errors.EXIT_RETRYABLE, out
  waited = float(re.search(r"made no progress in phase 'train' for (\d+)s", out).group(1))
  assert waited >= 1.5 - 0.5, out  # 0.5s of silence + 1s of the chief's retries
  assert ("the chief may still be uploading the checkpoint (this phase allowed "
          "TRAINER_STORAGE_RETRY_DEADLINE_S=1s on top for the chief's storage retries)") in out
  assert elapsed < 20


def test_chief_gets_no_storage_allowance():
  code, out, elapsed = _run("""
      watchdog = watchdog_lib.Watchdog(PEERS, 0.5, "worker:0", is_chief=True)
      with watchdog.phase("model initialization"):
        time.sleep(30)
      """, TRAINER_STORAGE_RETRY_DEADLINE_S=60)
  assert code == errors.EXIT_RETRYABLE and "chief" not in out, out
  assert elapsed < 20


@pytest.mark.slow
def test_strategy_creation_with_a_silent_peer_exits_143(tmp_path):
  # worker:1's port accepts connections (so the rendezvous passes) but never speaks gRPC:
  # MultiWorkerMirroredStrategy's constructor then waits inside TensorFlow holding the GIL.
  silent = socket.socket()
  silent.bind(("127.0.0.1", 0))
  silent.listen(8)
  own = launcher.free_ports(1)[0]
  tf_config = {"cluster": {"worker": [f"localhost:{own}", f"localhost:{silent.getsockname()[1]}"]},
               "task": {"type": "worker", "index": 0}}
  # Strategy creation comes before the data is read: the data_dir need not exist.
  args = tiny_flags(str(tmp_path / "run"), str(tmp_path / "tfds"), collective_timeout_s=5)
  start = time.monotonic()
  try:
    result = subprocess.run([sys.executable, "-m", "trainer.task", *args],
                            env=child_env(TF_CONFIG=json.dumps(tf_config)), cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            timeout=120)
  except subprocess.TimeoutExpired as e:
    pytest.fail(f"strategy creation hung past 120s:\n{(e.output or b'')[-3000:]}")
  finally:
    silent.close()
  out = result.stdout
  assert result.returncode == errors.EXIT_RETRYABLE, out[-3000:]
  assert "made no progress in phase 'strategy creation (every worker must join)' for 5s" in out
  assert time.monotonic() - start < 90
