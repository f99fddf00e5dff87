"""The import structure of cas/ (issue 23): no import cycles between cas modules, counting imports
inside functions (only a script's `if __name__ == "__main__":` block is left out: it does not run
when the module is imported), and every user-error class that launch/entry.py names by its module
path exists there (moving a class changes that path)."""
import ast
import importlib
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _modules() -> dict[str, str]:
  out = {}
  for dp, _, fs in os.walk(os.path.join(REPO, "cas")):
    for f in fs:
      if f.endswith(".py"):
        path = os.path.join(dp, f)
        name = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
        out[name[:-len(".__init__")] if name.endswith(".__init__") else name] = path
  return out


def import_graph() -> dict[str, set[str]]:
  """cas module -> the cas modules it imports (top level or inside functions). `from pkg import
  sub` counts as an import of pkg.sub; a package's parent is not counted (Python imports it first)."""
  mods = _modules()

  def resolve(name):
    parts = name.split(".")
    while parts and ".".join(parts) not in mods:
      parts.pop()
    return ".".join(parts) or None

  graph = {m: set() for m in mods}
  for m, path in mods.items():
    tree = ast.parse(open(path).read())
    skip = {id(n) for top in tree.body if isinstance(top, ast.If) and "__main__" in ast.unparse(top.test)
            for n in ast.walk(top)}
    for node in ast.walk(tree):
      if id(node) in skip:
        continue
      if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
          pkg = m.split(".") if path.endswith("__init__.py") else m.split(".")[:-1]
          base = ".".join(pkg[:len(pkg) - node.level + 1] + ([node.module] if node.module else []))
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
      else:
        continue
      for n in names:
        r = resolve(n) if n.split(".")[0] == "cas" else None
        if r and r != m:
          graph[m].add(r)
  return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """The strongly connected components of more than one module (Tarjan)."""
  index, low, stack, on, out = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on.add(v)
    for w in graph[v]:
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      comp = []
      while True:
        w = stack.pop()
        on.discard(w)
        comp.append(w)
        if w == v:
          break
      if len(comp) > 1:
        out.append(sorted(comp))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return out


def test_no_import_cycles_between_cas_modules():
  graph = import_graph()
  assert "cas.pipeline" in graph and "cas.eval.cas_methods" in graph["cas.pipeline"]  # the graph is real
  assert "cas.rotation.store" in graph["cas.rotation.store_upgrade"]
  found = cycles(graph)
  assert found == [], "import cycles: " + "; ".join(
      " <-> ".join(c) + " (" + ", ".join(f"{a} -> {b}" for a in c for b in sorted(graph[a]) if b in c) + ")"
      for c in found)


def test_a_cycle_is_found():
  """The checker itself: a two-module cycle and a longer one are reported, a chain is not."""
  assert cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]
  assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c"]]
  assert cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_user_errors_of_the_launchers_name_existing_classes():
  from launch.entry import USER_ERRORS
  for path in USER_ERRORS:
    module, _, name = path.rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    assert isinstance(cls, type) and issubclass(cls, BaseException), path
    assert f"{cls.__module__}.{cls.__qualname__}" == path  # what launch.entry.exit_status looks up
