"""The package's plan stays true: read from the source, every import between trainer modules
points down the layers, none forms a circle, and no module reaches for another's private name.

Layers, lowest first; a module may import its own layer's modules (without a circle) and the
layers below it, never one above:
  base      trainer/{errors,cli,logs,startup,options,validation,config}.py (no TensorFlow)
  storage   trainer/storage/   one interface, its backends, locks and fencing
  runtime   trainer/runtime/   the process in its cluster (knows nothing of data or models)
  data      trainer/data/      sources, preparation, caches, input pipelines
  training  the rest of trainer/ (model, step, actions, train, evaluator, export, outputs...)
  entry     trainer/{task,predict,launcher}.py
"""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAINER = os.path.join(ROOT, "trainer")
BASE = {"trainer", "trainer.errors", "trainer.cli", "trainer.logs", "trainer.startup",
        "trainer.options", "trainer.validation", "trainer.config"}
ENTRY = {"trainer.task", "trainer.predict", "trainer.launcher"}
LAYERS = ("base", "storage", "runtime", "data", "training", "entry")


def layer(module: str) -> str:
  if module in BASE:
    return "base"
  if module in ENTRY:
    return "entry"
  for package in ("storage", "runtime", "data"):
    if module == f"trainer.{package}" or module.startswith(f"trainer.{package}."):
      return package
  return "training"


def modules() -> dict:
  found = {}
  for folder, _, files in os.walk(TRAINER):
    for name in files:
      if name.endswith(".py"):
        path = os.path.join(folder, name)
        module = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
        found[module[:-len(".__init__")] if module.endswith(".__init__") else module] = path
  return found


def imports(path: str, known) -> list:
  """(imported trainer module, names taken from it) for every import in the file, including
  the ones inside functions."""
  out = []
  for node in ast.walk(ast.parse(open(path).read(), path)):
    if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "trainer":
      for alias in node.names:
        full = f"{node.module}.{alias.name}"
        out.append((full, ()) if full in known else (node.module, (alias.name,)))
    elif isinstance(node, ast.Import):
      out += [(a.name, ()) for a in node.names if a.name.split(".")[0] == "trainer"]
  return out


def test_imports_point_down_and_never_circle():
  known = modules()
  graph, upward = {}, []
  for module, path in known.items():
    graph[module] = set()
    for target, _ in imports(path, known):
      if target == module or target not in known:
        continue
      graph[module].add(target)
      if LAYERS.index(layer(target)) > LAYERS.index(layer(module)):
        upward.append(f"{module} ({layer(module)}) imports {target} ({layer(target)})")
  assert not upward, "\n".join(upward)
  assert not _circles(graph), _circles(graph)


def test_no_module_takes_another_modules_private_name():
  known = modules()
  taken = []
  for module, path in known.items():
    for target, names in imports(path, known):
      taken += [f"{module}: from {target} import {n}" for n in names if n.startswith("_")]
    tree = ast.parse(open(path).read(), path)
    aliases = {a.asname or a.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
               and node.module and node.module.startswith("trainer") for a in node.names}
    for node in ast.walk(tree):
      if (isinstance(node, ast.Attribute) and node.attr.startswith("_")
          and not node.attr.startswith("__") and isinstance(node.value, ast.Name)
          and node.value.id in aliases):
        taken.append(f"{module}: {node.value.id}.{node.attr}")
  assert not taken, "\n".join(taken)


def test_the_layer_rule_catches_an_upward_import():
  """The checker itself: a data module importing the training loop is named."""
  assert LAYERS.index(layer("trainer.train")) > LAYERS.index(layer("trainer.data.stream"))
  assert _circles({"a": {"b"}, "b": {"a"}, "c": set()}) == [["a", "b"]]


def _circles(graph) -> list:
  """Strongly connected groups of more than one module (Tarjan), each sorted."""
  index, low, stack, on_stack, found = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in graph.get(v, ()):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      group = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        group.append(w)
        if w == v:
          break
      if len(group) > 1:
        found.append(sorted(group))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return sorted(found)
