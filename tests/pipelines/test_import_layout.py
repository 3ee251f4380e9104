"""The preference-side pipelines import each other one way: none of them reaches itself through
the imports of slicjax.pipelines (imports inside functions count too)."""

import ast
import os

import slicjax.pipelines

PKG = os.path.dirname(slicjax.pipelines.__file__)


def _imports(path: str) -> set[str]:
  """Names of sibling pipeline modules imported anywhere in ``path``."""
  names = set()
  for node in ast.walk(ast.parse(open(path).read())):
    if isinstance(node, ast.ImportFrom) and node.module:
      if node.module == "slicjax.pipelines":
        names |= {a.name for a in node.names}
      elif node.module.startswith("slicjax.pipelines."):
        names.add(node.module.split(".")[2])
    elif isinstance(node, ast.Import):
      names |= {a.name.split(".")[2] for a in node.names
                if a.name.startswith("slicjax.pipelines.")}
  return names


def _graph() -> dict[str, set[str]]:
  mods = {f[:-3] for f in os.listdir(PKG) if f.endswith(".py") and f != "__init__.py"}
  return {m: _imports(os.path.join(PKG, f"{m}.py")) & mods for m in mods}


def _cycle(graph):
  """One import cycle as a list of modules, or None."""
  state, stack = {}, []

  def visit(m):
    state[m] = "open"
    stack.append(m)
    for n in sorted(graph[m]):
      if state.get(n) == "open":
        return stack[stack.index(n):] + [n]
      if n not in state:
        found = visit(n)
        if found:
          return found
    stack.pop()
    state[m] = "done"
    return None

  for m in sorted(graph):
    if m not in state:
      found = visit(m)
      if found:
        return found
  return None


PREFERENCE_SIDE = ("gold_experiment", "preference", "preference_pairs", "reward", "rso")


def _reaches(graph, start, goal) -> bool:
  seen, todo = set(), list(graph[start])
  while todo:
    m = todo.pop()
    if m == goal:
      return True
    if m not in seen:
      seen.add(m)
      todo.extend(graph[m])
  return False


def test_preference_pipelines_import_one_way():
  graph = _graph()
  assert set(PREFERENCE_SIDE) <= set(graph)
  looping = [m for m in PREFERENCE_SIDE if _reaches(graph, m, m)]
  assert not looping, f"{looping} import themselves back through slicjax.pipelines"
  sub = {m: graph[m] & set(PREFERENCE_SIDE) for m in PREFERENCE_SIDE}
  assert _cycle(sub) is None


def test_the_cycle_finders_find_a_cycle():
  g = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
  assert _cycle(g) == ["a", "b", "c", "a"]
  assert _reaches(g, "a", "a") and not _reaches(g, "d", "d")
  assert _cycle({"a": {"b"}, "b": set()}) is None
