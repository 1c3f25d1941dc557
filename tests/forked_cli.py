"""`python -m MODULE ARGS` for tests that run one command line many times: each run is a process
of its own, forked from a server process that imported the command's heavy libraries once.

A run is what `python -m` makes of it: its own process, the module executed as __main__ by
runpy.run_module(alter_sys=True) (what `-m` does: docs.python.org/3/library/runpy.html), its
own sys.argv and absl flags, stdout and stderr of its own, and the interpreter's exit status
(SystemExit's code; 1 and a traceback for an uncaught exception). Only the start-up differs: the
libraries the server preloaded are imported already. deploy.vertex imports
google.cloud.aiplatform_v1 to check every request body, and that package's __init__ imports
every service client it has: 0.8 s of CPU a run, 1.1 s with the rest, against 0.05 s forked.
"""

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class ForkServer:
  """Runs `python -m module ...` (run()) in processes forked from one that imported `preload`;
  env adds to os.environ as it is when the server starts (at the first run). cwd: the repo."""

  def __init__(self, module: str, preload=(), **env):
    self.module, self.preload, self.env = module, tuple(preload), env
    self._proc = None
    self._dir = None
    self._pending = b""

  def run(self, *args, timeout: float = 120) -> subprocess.CompletedProcess:
    """A CompletedProcess as subprocess.run(capture_output=True, text=True) returns it;
    subprocess.TimeoutExpired (the run killed) after timeout seconds."""
    if self._proc is None:
      self._start()
    out, err = (os.path.join(self._dir, name) for name in ("stdout", "stderr"))
    request = {"module": self.module, "args": [str(a) for a in args], "stdout": out,
               "stderr": err}
    self._proc.stdin.write((json.dumps(request) + "\n").encode())
    self._proc.stdin.flush()
    pid = self._answer(60)["pid"]
    try:
      rc = self._answer(timeout)["rc"]
    except subprocess.TimeoutExpired:
      os.kill(pid, signal.SIGKILL)
      self._answer(60)
      raise subprocess.TimeoutExpired([self.module, *args], timeout) from None
    with open(out) as f_out, open(err) as f_err:
      stdout, stderr = f_out.read(), f_err.read()
    return subprocess.CompletedProcess([sys.executable, "-m", self.module, *args], rc, stdout,
                                       stderr)

  def close(self) -> None:
    if self._proc is not None:
      self._proc.stdin.close()  # the server's loop ends
      try:
        self._proc.wait(timeout=30)
      except subprocess.TimeoutExpired:
        self._proc.kill()
        self._proc.wait()
      self._proc = None
    if self._dir is not None:
      shutil.rmtree(self._dir, ignore_errors=True)
      self._dir = None

  def _start(self) -> None:
    self._dir = tempfile.mkdtemp(prefix="forked-cli-")
    self._pending = b""
    self._proc = subprocess.Popen(
        [sys.executable, "-c", _SERVER, json.dumps(self.preload)], cwd=ROOT,
        env=dict(os.environ, **self.env), stdin=subprocess.PIPE, stdout=subprocess.PIPE)

  def _answer(self, timeout: float) -> dict:
    """The server's next line (read unbuffered, so select() sees every byte not yet read)."""
    fd = self._proc.stdout.fileno()
    while b"\n" not in self._pending:
      ready, _, _ = select.select([fd], [], [], timeout)
      if not ready:
        raise subprocess.TimeoutExpired(self.module, timeout)
      chunk = os.read(fd, 65536)
      if not chunk:
        raise RuntimeError(f"the fork server of {self.module} exited "
                           f"({self._proc.wait()}); its stderr is the test's")
      self._pending += chunk
    line, self._pending = self._pending.split(b"\n", 1)
    return json.loads(line)


# The server: one JSON request a line on stdin; for each, a child runs the module while the
# server answers {"pid": ...} and then, when the child has exited, {"rc": ...} (Popen's
# returncode: negative for a signal).
_SERVER = r"""
import atexit, gc, importlib, json, os, runpy, sys
for name in json.loads(sys.argv[1]):
  importlib.import_module(name)
gc.freeze()  # children share the preloaded objects' pages (the docs' advice for forking)

def answer(**message):
  sys.stdout.write(json.dumps(message) + "\n")
  sys.stdout.flush()

for line in sys.stdin:
  request = json.loads(line)
  pid = os.fork()
  if pid == 0:
    for fd, path in ((0, os.devnull), (1, request["stdout"]), (2, request["stderr"])):
      opened = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC if fd else os.O_RDONLY, 0o600)
      os.dup2(opened, fd)
      os.close(opened)
    sys.argv = ["-m", *request["args"]]
    code = 0
    try:
      runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
    except SystemExit as e:  # as the interpreter reads it (Python/pythonrun.c)
      if e.code is None or isinstance(e.code, int):
        code = e.code or 0
      else:
        print(e.code, file=sys.stderr)
        code = 1
    except BaseException:
      sys.excepthook(*sys.exc_info())
      code = 1
    # The exit handlers and flushed output of an interpreter exit, without the teardown of
    # every preloaded module (half a second a run), as trainer/startup.py exit_without_teardown
    # does; where CPython lacks the handler runner, the interpreter's own exit.
    run_exit_handlers = getattr(atexit, "_run_exitfuncs", None)
    if not callable(run_exit_handlers):
      sys.exit(code)
    run_exit_handlers()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code & 0xFF)
  answer(pid=pid)
  answer(rc=os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
"""
