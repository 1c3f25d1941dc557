"""Static checks of deploy/Dockerfile: base tag vs setup.py pin, user, entrypoint, build context."""

import ast
import json
import os
import pathlib
import re

from packaging import requirements
from packaging import utils as packaging_utils
from packaging import version

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
# BuildKit reads <Dockerfile>.dockerignore next to the Dockerfile given with -f.
DOCKERIGNORE = ROOT / "deploy" / "Dockerfile.dockerignore"


# ---- A small Dockerfile reader: logical lines (continuations joined, comments dropped). ----

def instructions(text: str) -> list:
  """[(INSTRUCTION, arguments)] in order."""
  out, pending = [], ""
  for raw in text.splitlines():
    line = raw.strip()
    if not line or line.startswith("#"):
      continue  # Docker drops comment lines, even inside a continuation.
    if line.endswith("\\"):
      pending += line[:-1] + " "
      continue
    logical = pending + line
    pending = ""
    keyword, _, rest = logical.partition(" ")
    out.append((keyword.upper(), rest.strip()))
  return out


def copy_sources(instrs: list) -> list:
  sources = []
  for keyword, rest in instrs:
    if keyword not in ("COPY", "ADD"):
      continue
    if rest.startswith("["):
      parts = json.loads(rest)
    else:
      parts = [p for p in rest.split() if not p.startswith("--")]
    sources.extend(parts[:-1])  # The last one is the destination.
  return sources


# ---- .dockerignore semantics (moby patternmatcher): last match wins, parents count. ----

def _pattern_regex(pattern: str):
  out, i = "", 0
  while i < len(pattern):
    if pattern.startswith("**/", i):
      out, i = out + "(?:.*/)?", i + 3
    elif pattern.startswith("**", i):
      out, i = out + ".*", i + 2
    elif pattern[i] == "*":
      out, i = out + "[^/]*", i + 1
    elif pattern[i] == "?":
      out, i = out + "[^/]", i + 1
    elif pattern[i] == "[":
      end = pattern.index("]", i)
      body = pattern[i + 1:end]
      out += "[" + ("^" + body[1:] if body.startswith("!") else body) + "]"
      i = end + 1
    else:
      out, i = out + re.escape(pattern[i]), i + 1
  return re.compile(out + "$")


def ignore_rules(text: str) -> list:
  """[(regex, is_exception, cleaned pattern)] from .dockerignore text."""
  rules = []
  for raw in text.splitlines():
    line = raw.strip()
    if not line or line.startswith("#"):
      continue
    exception = line.startswith("!")
    pattern = os.path.normpath(line[1:].strip() if exception else line).lstrip("/")
    rules.append((_pattern_regex(pattern), exception, pattern))
  return rules


def is_ignored(path: str, rules: list) -> bool:
  parents = [path]
  parts = path.split("/")
  parents += ["/".join(parts[:i]) for i in range(1, len(parts))]
  ignored = False
  for regex, exception, _ in rules:
    if any(regex.match(p) for p in parents):
      ignored = not exception
  return ignored


def context_files(root: pathlib.Path, rules: list) -> set:
  """Files `docker build` would send, relative to root."""
  exceptions = [p for _, exc, p in rules if exc]
  files = set()
  for dirpath, dirnames, filenames in os.walk(root):
    rel_dir = os.path.relpath(dirpath, root)
    rel_dir = "" if rel_dir == "." else rel_dir + "/"
    # Skip walking huge ignored trees (.venv) unless an exception could re-include inside them.
    dirnames[:] = [d for d in dirnames if not is_ignored(rel_dir + d, rules)
                   or any(e.startswith((rel_dir + d + "/", "**")) for e in exceptions)]
    files.update(rel_dir + f for f in filenames if not is_ignored(rel_dir + f, rules))
  return files


def copied_files(sources: list, context: set) -> set:
  out = set()
  for source in sources:
    source = os.path.normpath(source).lstrip("/")
    if source == ".":
      return set(context)
    regex = _pattern_regex(source)
    out.update(f for f in context if regex.match(f) or f.startswith(source.rstrip("/") + "/"))
  return out


# ---- Tests ----

def _instrs():
  return instructions(DOCKERFILE.read_text())


def _tensorflow_pin():
  tree = ast.parse((ROOT / "setup.py").read_text())
  for node in ast.walk(tree):
    if isinstance(node, ast.keyword) and node.arg == "install_requires":
      for text in ast.literal_eval(node.value):
        req = requirements.Requirement(text)
        if packaging_utils.canonicalize_name(req.name) == "tensorflow":
          return req
  raise AssertionError("setup.py's install_requires has no tensorflow requirement")


def test_base_image_is_the_official_gpu_image_of_the_pinned_version():
  froms = [rest for keyword, rest in _instrs() if keyword == "FROM"]
  assert len(froms) == 1, froms
  image, _, tag = froms[0].split()[0].partition(":")
  assert image == "tensorflow/tensorflow"
  assert tag.endswith("-gpu"), tag
  pin = _tensorflow_pin()
  tag_version = version.Version(tag[:-len("-gpu")])
  assert tag_version in pin.specifier, f"FROM tag {tag} is outside setup.py's pin {pin}"
  # The tag is a full release, so the same TensorFlow runs locally and in the image.
  assert len(tag_version.release) == 3


def test_runs_as_a_non_root_user_before_the_entrypoint():
  instrs = _instrs()
  keywords = [k for k, _ in instrs]
  entry = keywords.index("ENTRYPOINT")
  users = [rest for k, rest in instrs[:entry] if k == "USER"]
  assert users, "no USER before ENTRYPOINT: the trainer would run as root"
  user = users[-1].split(":")[0]
  assert user not in ("root", "0"), users[-1]
  # Numeric, so Kubernetes' runAsNonRoot can verify it; deploy/k8s.py must use the same UID.
  assert user.isdigit()
  from deploy import k8s
  assert int(user) == k8s.RUN_AS_USER
  assert "USER" not in keywords[entry:], "a later USER would change who runs the trainer"


def test_entrypoint_is_the_trainer_module():
  entrypoints = [rest for k, rest in _instrs() if k == "ENTRYPOINT"]
  assert len(entrypoints) == 1
  assert json.loads(entrypoints[0]) == ["python", "-m", "trainer.task"]
  # A CMD would be appended to every platform's arguments (Vertex AI replaces it; others not).
  assert "CMD" not in [k for k, _ in _instrs()]


def test_build_installs_the_package_from_setup_py():
  runs = " ".join(rest for k, rest in _instrs() if k == "RUN")
  assert re.search(r"pip install [\"']?\.(\[[a-z,]+\])?[\"']?", runs), runs


LEAK_PREFIXES = ("tests/", "data/", ".venv/", ".git/", "dist/", "deploy/")


def leaks(copied: set) -> list:
  """Copied files that must not be in the image."""
  return sorted(f for f in copied if f.startswith(LEAK_PREFIXES) or "__pycache__" in f
                or f.endswith(".pyc"))


def test_image_gets_the_package_and_setup_py_but_no_tests_data_or_venv():
  rules = ignore_rules(DOCKERIGNORE.read_text())
  copied = copied_files(copy_sources(_instrs()), context_files(ROOT, rules))
  assert "setup.py" in copied
  package = {f"trainer/{p.name}" for p in (ROOT / "trainer").glob("*.py")}
  assert package and package <= copied, sorted(package - copied)
  assert not leaks(copied), leaks(copied)[:10]


def test_ignore_rules_keep_heavy_directories_out_of_the_context():
  rules = ignore_rules(DOCKERIGNORE.read_text())
  for path in (".venv/bin/python", "data/mnist/SHA256SUMS", "tests/deploy_docker_test.py",
               ".git/HEAD", "dist/x.tar.gz", "runs/mnist/metrics.json", "mnist.egg-info/PKG-INFO",
               "trainer/__pycache__/task.cpython-311.pyc"):
    assert is_ignored(path, rules), path
  for path in ("setup.py", "trainer/task.py", "trainer/__init__.py"):
    assert not is_ignored(path, rules), path


def test_the_context_check_catches_a_leaky_build():
  """`COPY . .` with a weak ignore file leaks tests/ and data/: the check above would fail."""
  weak = ignore_rules(".venv\n.git\n")
  copied = copied_files(["."], context_files(ROOT, weak))
  found = leaks(copied)
  assert any(f.startswith("tests/") for f in found)
  assert any(f.startswith("data/") for f in found)
  # And a pattern that would match nothing useful leaves setup.py out.
  assert "setup.py" not in copied_files(["trainer/"], context_files(ROOT, weak))
