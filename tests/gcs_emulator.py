"""Test helpers: a gcp-storage-emulator subprocess and a fault-injecting HTTP proxy for it."""

import collections
import contextlib
import http.server
import json
import os
import random
import re
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

PROJECT = "test-project"
_START_TIMEOUT_S = 20.0
_SOCKET_TIMEOUT_S = 30.0
_HOP_HEADERS = frozenset(("connection", "keep-alive", "proxy-connection", "transfer-encoding",
                          "content-length", "te", "upgrade"))


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _emulator_command() -> list:
  exe = os.path.join(os.path.dirname(sys.executable), "gcp-storage-emulator")
  if os.path.exists(exe):
    return [exe]
  found = shutil.which("gcp-storage-emulator")
  return [found] if found else [sys.executable, "-m", "gcp_storage_emulator"]


def _http(method: str, url: str, body=None, timeout=5.0):
  """(status, body bytes) of one plain request; HTTP errors are results, not exceptions."""
  data = json.dumps(body).encode() if body is not None else None
  request = urllib.request.Request(url, data=data, method=method,
                                   headers={"Content-Type": "application/json"} if data else {})
  try:
    with urllib.request.urlopen(request, timeout=timeout) as response:
      return response.status, response.read()
  except urllib.error.HTTPError as exc:
    return exc.code, exc.read()


def _object_metadata(host: str, bucket: str, name: str):
  quoted = urllib.parse.quote(name, safe="")
  status, body = _http("GET", f"{host}/storage/v1/b/{bucket}/o/{quoted}")
  return json.loads(body) if status == 200 else None


class Emulator:
  """gcp-storage-emulator on a free port, in memory, for the duration of a `with` block."""

  def __init__(self, project: str = PROJECT):
    self.project = project
    self.port = free_port()
    self.host = f"http://127.0.0.1:{self.port}"
    self._proc = None
    self._log = None

  def __enter__(self):
    # A file, not a pipe: the emulator logs every request, and a full pipe would block it.
    self._log = tempfile.TemporaryFile()
    self._proc = subprocess.Popen(
        _emulator_command() + ["start", "--host", "127.0.0.1", "--port", str(self.port),
                               "--in-memory"],
        stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT)
    try:
      self._wait_ready()
    except BaseException:
      self.__exit__(None, None, None)
      raise
    return self

  def __exit__(self, *exc_info):
    if self._proc is not None and self._proc.poll() is None:
      self._proc.terminate()
      try:
        self._proc.wait(timeout=5)
      except subprocess.TimeoutExpired:
        self._proc.kill()
        self._proc.wait(timeout=5)
    if self._log is not None:
      self._log.close()

  def _wait_ready(self):
    deadline = time.monotonic() + _START_TIMEOUT_S
    while time.monotonic() < deadline:
      if self._proc.poll() is not None:
        raise RuntimeError(f"gcp-storage-emulator exited with {self._proc.returncode}:\n"
                           f"{self.log_tail()}")
      try:
        if _http("GET", self.host + "/", timeout=1.0)[0] == 200:
          return
      except OSError:
        pass
      time.sleep(0.1)
    raise RuntimeError(f"gcp-storage-emulator did not answer on {self.host} within "
                       f"{_START_TIMEOUT_S:.0f} s:\n{self.log_tail()}")

  def log_tail(self, limit: int = 4000) -> str:
    self._log.seek(0)
    return self._log.read().decode("utf-8", "replace")[-limit:]

  def env(self) -> dict:
    """What a process (this one or a child) needs to talk to this emulator."""
    return {"STORAGE_EMULATOR_HOST": self.host, "GOOGLE_CLOUD_PROJECT": self.project}

  def create_bucket(self, name: str) -> None:
    status, body = _http("POST", f"{self.host}/storage/v1/b?project={self.project}",
                         body={"name": name})
    if status not in (200, 409):
      raise RuntimeError(f"creating bucket {name} failed: {status} {body[:200]!r}")

  def object_names(self, bucket: str, prefix: str = "") -> list:
    """Every object name under prefix, straight from the emulator (no client, no proxy)."""
    query = urllib.parse.urlencode({"prefix": prefix})
    status, body = _http("GET", f"{self.host}/storage/v1/b/{bucket}/o?{query}")
    if status != 200:
      raise RuntimeError(f"listing gs://{bucket}/{prefix} failed: {status}")
    return [item["name"] for item in json.loads(body).get("items") or []]

  def object(self, bucket: str, name: str):
    """The object's metadata dict, or None."""
    return _object_metadata(self.host, bucket, name)

  def downloads(self, bucket: str) -> collections.Counter:
    """{object name: times its bytes were served} so far, from the emulator's request log."""
    # pread: seeking would move the offset the emulator writes at (the file is shared).
    fd = self._log.fileno()
    text = os.pread(fd, os.fstat(fd).st_size, 0).decode("utf-8", "replace")
    pattern = re.compile(rf'"GET /download/storage/v1/b/{re.escape(bucket)}/o/([^?\s]+)\S* '
                         r'HTTP/[\d.]+" 200')
    return collections.Counter(urllib.parse.unquote(m) for m in pattern.findall(text))


FAULT_MODES = ("503", "reset", "reset_mid_body", "drop_response", "truncate_response")


class FaultProxy:
  """An HTTP proxy to `upstream` that fails a seeded random fraction of requests.

  Modes: "503" answers 503 without forwarding; "reset" resets the connection after the request
  headers; "reset_mid_body" after half the request body (mid-upload); "drop_response" forwards
  and then resets instead of answering (the request took effect, the client cannot know);
  "truncate_response" forwards and resets after half the response (mid-download).

  The emulator ignores preconditions, so with enforce_preconditions the proxy checks them and
  answers 412 itself, like GCS would: ifGenerationMatch and ifMetagenerationMatch on upload
  starts (multipart and resumable), metadata updates (PATCH), deletes and compose (for its
  destination), and each compose source's objectPreconditions.ifGenerationMatch. Every request
  that writes is checked and forwarded under one lock shared by all proxies of this process,
  so a precondition and its write are atomic, as in GCS, even for two clients on two proxies.
  `responses` lists (method, path without query, object name or None, status,
  time.monotonic()) per answer; writes() picks the successful writes from it.
  forbid_bucket answers 403 to every request that touches that bucket (the emulator has no IAM).
  `script` lists (request prefix, mode) pairs, used in order: the next request whose
  "METHOD /path" starts with the prefix ("PUT", "GET /download") gets the mode. Matching beats
  counting requests because the client library also fetches bucket metadata from a background
  thread at unpredictable moments.
  """

  def __init__(self, upstream: str, fail_rate: float = 0.0, seed: int = 0, modes=FAULT_MODES,
               forbid_bucket=None, enforce_preconditions: bool = True, script=()):
    self.upstream = urllib.parse.urlparse(upstream)
    self.fail_rate = fail_rate
    self.modes = tuple(modes)
    self.forbid_bucket = forbid_bucket
    self.enforce_preconditions = enforce_preconditions
    self._script = collections.deque(script)
    self._rng = random.Random(seed)
    self._lock = threading.Lock()
    self.counts = collections.Counter()
    self.history = []  # (method, path without query, fault or None) per request
    self.responses = []  # (method, path without query, object, status, monotonic time)
    self._server = None
    self._thread = None
    self.host = None

  @property
  def forwarded(self) -> int:
    return self.counts["forwarded"]

  @property
  def failed(self) -> int:
    return sum(self.counts[mode] for mode in FAULT_MODES)

  def __enter__(self):
    self._server = _ProxyServer(("127.0.0.1", 0), _ProxyHandler)
    self._server.proxy = self
    self.host = f"http://127.0.0.1:{self._server.server_address[1]}"
    self._thread = threading.Thread(target=self._server.serve_forever, name="fault-proxy",
                                    kwargs={"poll_interval": 0.1}, daemon=True)
    self._thread.start()
    return self

  def __exit__(self, *exc_info):
    self._server.shutdown()
    self._server.server_close()
    self._thread.join(timeout=5)

  def env(self) -> dict:
    return {"STORAGE_EMULATOR_HOST": self.host, "GOOGLE_CLOUD_PROJECT": PROJECT}

  def draw(self, method: str, path: str):
    """The fault for the next request, or None."""
    with self._lock:
      self.counts["requests"] += 1
      fault = None
      if self._script and f"{method} {path}".startswith(self._script[0][0]):
        fault = self._script.popleft()[1]
      elif self.fail_rate and self._rng.random() < self.fail_rate:
        fault = self._rng.choice(self.modes)
      self.history.append((method, urllib.parse.urlsplit(path).path, fault))
      return fault

  def count(self, key: str) -> None:
    with self._lock:
      self.counts[key] += 1

  def record(self, method: str, path: str, body: bytes, status: int) -> None:
    with self._lock:
      self.responses.append((method, urllib.parse.urlsplit(path).path,
                             _object_of(method, path, body), status, time.monotonic()))

  def writes(self, since: float = 0.0, status=range(200, 300)) -> list:
    """(method, object name) of the writes (not GET) answered with `status` since a monotonic
    time; the name is None where the request names none (a resumable upload's chunks)."""
    with self._lock:
      return [(m, name) for m, _, name, code, at in self.responses
              if m != "GET" and at >= since and code in status]


# Preconditions are checked and the write forwarded under this lock (see FaultProxy).
_WRITE_LOCK = threading.Lock()


class _ProxyServer(http.server.ThreadingHTTPServer):
  daemon_threads = True
  proxy = None

  def handle_error(self, request, client_address):
    # Injected resets and clients that give up surface as these; anything else is a proxy bug.
    if not isinstance(sys.exc_info()[1], (OSError, ValueError)):
      super().handle_error(request, client_address)


class _ProxyHandler(http.server.BaseHTTPRequestHandler):
  """Relays one request per connection (HTTP/1.0 style: the connection closes after it)."""

  timeout = _SOCKET_TIMEOUT_S

  def log_message(self, format, *args):  # pylint: disable=redefined-builtin
    pass

  def _relay(self):
    proxy = self.server.proxy
    if proxy.forbid_bucket and _touches_bucket(self.path, proxy.forbid_bucket):
      self._read_body()
      proxy.count("forbidden")
      return self._send_json(403, _error(403, "forbidden", (
          "caller does not have storage.objects.create access to the Google Cloud Storage "
          "object. Permission 'storage.objects.create' denied on resource (or it may not exist).")))
    if self.headers.get("Authorization"):
      proxy.count("with_authorization")
    fault = proxy.draw(self.command, self.path)
    if fault:
      proxy.count(fault)
    if fault == "reset":
      return self._reset()
    if fault == "reset_mid_body":
      self._read_body(fraction=0.5)
      return self._reset()
    body = self._read_body()
    if fault == "503":
      proxy.record(self.command, self.path, body, 503)
      return self._send_json(503, _error(503, "backendError", "Service Unavailable (injected)"))
    writes = self.command in ("POST", "PUT", "PATCH", "DELETE") and proxy.enforce_preconditions
    with _WRITE_LOCK if writes else contextlib.nullcontext():
      if writes and self._precondition_fails(body):
        proxy.count("precondition_failed")
        proxy.record(self.command, self.path, body, 412)
        return self._send_json(412, _error(
            412, "conditionNotMet",
            "At least one of the pre-conditions you specified did not hold."))
      response = self._forward(body)
    proxy.record(self.command, self.path, body, _status_of(response))
    if fault == "drop_response":
      return self._reset()
    if fault == "truncate_response":
      self.wfile.write(response[:len(response) // 2])
      return self._reset()
    proxy.count("forwarded")
    self.wfile.write(response)

  do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _relay

  def _read_body(self, fraction: float = 1.0) -> bytes:
    if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
      return self._read_chunked()
    length = int(self.headers.get("Content-Length") or 0)
    return self.rfile.read(int(length * fraction))

  def _read_chunked(self) -> bytes:
    parts = []
    while True:
      size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
      if size == 0:
        while self.rfile.readline() not in (b"\r\n", b"\n", b""):
          pass  # trailers
        return b"".join(parts)
      parts.append(self.rfile.read(size))
      self.rfile.readline()

  def _reset(self):
    # SO_LINGER 0 makes close() send RST, which clients see as "connection reset by peer".
    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    self.rfile.close()
    self.wfile.close()
    self.connection.close()
    self.close_connection = True

  def _send_json(self, status: int, payload: dict):
    body = json.dumps(payload).encode()
    self.send_response(status)
    self.send_header("Content-Type", "application/json; charset=UTF-8")
    self.send_header("Content-Length", str(len(body)))
    self.send_header("Connection", "close")
    self.end_headers()
    self.wfile.write(body)
    self.close_connection = True

  def _forward(self, body: bytes) -> bytes:
    """The upstream's raw response (status line, headers, body) to the same request."""
    lines = [f"{self.command} {self.path} HTTP/1.1"]
    lines += [f"{k}: {v}" for k, v in self.headers.items() if k.lower() not in _HOP_HEADERS]
    lines += [f"Content-Length: {len(body)}", "Connection: close"]
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    address = (self.server.proxy.upstream.hostname, self.server.proxy.upstream.port)
    with socket.create_connection(address, timeout=_SOCKET_TIMEOUT_S) as upstream:
      upstream.sendall(head + body)
      chunks = []
      for chunk in iter(lambda: upstream.recv(1 << 16), b""):
        chunks.append(chunk)
    self.close_connection = True
    return b"".join(chunks)

  def _precondition_fails(self, body: bytes) -> bool:
    parts = urllib.parse.urlsplit(self.path)
    query = {k: v[0] for k, v in urllib.parse.parse_qs(parts.query).items()}
    wanted = (query.get("ifGenerationMatch"), query.get("ifMetagenerationMatch"))
    checks = []  # (bucket, object name, ifGenerationMatch, ifMetagenerationMatch)
    upload = re.fullmatch(r"/upload/storage/v1/b/([^/]+)/o", parts.path)
    compose = re.fullmatch(r"/storage/v1/b/([^/]+)/o/(.+)/compose", parts.path)
    single = re.fullmatch(r"/storage/v1/b/([^/]+)/o/([^/]+)", parts.path)
    if self.command == "POST" and upload and "upload_id" not in query:
      name = query["name"] if "name" in query else _object_name_in(body)
      if name is not None:
        checks.append((upload.group(1), name, *wanted))
    elif self.command == "POST" and compose:
      bucket = compose.group(1)
      checks.append((bucket, urllib.parse.unquote(compose.group(2)), *wanted))
      for source in json.loads(body or b"{}").get("sourceObjects") or []:
        condition = (source.get("objectPreconditions") or {}).get("ifGenerationMatch")
        checks.append((bucket, source["name"], condition, None))
    elif self.command in ("PATCH", "DELETE") and single:
      checks.append((single.group(1), urllib.parse.unquote(single.group(2)), *wanted))
    upstream = self.server.proxy.upstream
    for bucket, name, generation, metageneration in checks:
      if generation is None and metageneration is None:
        continue
      current = _object_metadata(f"{upstream.scheme}://{upstream.netloc}", bucket, name)
      if generation is not None and int(generation) != (int(current["generation"]) if current
                                                        else 0):
        return True
      if metageneration is not None and (current is None or int(metageneration) != int(
          current["metageneration"])):
        return True
    return False


def _object_of(method: str, path: str, body: bytes):
  """The object a JSON API request writes or reads, or None."""
  parts = urllib.parse.urlsplit(path)
  query = urllib.parse.parse_qs(parts.query)
  if re.fullmatch(r"/upload/storage/v1/b/[^/]+/o", parts.path):
    if "upload_id" in query:
      return None
    return query["name"][0] if "name" in query else _object_name_in(body)
  match = re.fullmatch(r"/(?:download/)?storage/v1/b/[^/]+/o/([^/]+)(?:/compose)?", parts.path)
  return urllib.parse.unquote(match.group(1)) if match else None


def _status_of(response: bytes) -> int:
  """The status code of a raw HTTP response (0 when unreadable)."""
  match = re.match(rb"HTTP/[\d.]+ (\d{3})", response)
  return int(match.group(1)) if match else 0


def _object_name_in(body: bytes):
  """The "name" of the JSON object metadata in a resumable or multipart upload start."""
  match = re.search(rb'"name"\s*:\s*("(?:[^"\\]|\\.)*")', body[:65536])
  return json.loads(match.group(1)) if match else None


def _touches_bucket(path: str, bucket: str) -> bool:
  path = urllib.parse.urlsplit(path).path
  return bool(re.search(rf"/b/{re.escape(bucket)}(/|$)", path)) or path.startswith(f"/{bucket}/")


def _error(code: int, reason: str, message: str) -> dict:
  return {"error": {"code": code, "message": message,
                    "errors": [{"domain": "global", "reason": reason, "message": message}]}}
