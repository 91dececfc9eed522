"""The import graph of oqt_jax/: no cycles between modules and (almost) no imports of oqt_jax's
own modules inside functions.

Read from the source with `ast`, nothing imported: an import anywhere in a file (top level,
inside a function, under `if` / `try`) is an edge, `from pkg import sub` an edge to pkg.sub,
a package's edge is its __init__.py's. Imports of third-party packages are not counted.
"""
import ast
import functools
import os

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'oqt_jax')
PKG = 'oqt_jax'
# Imports of oqt_jax modules inside functions allowed with a reason (target none).
MAX_FUNCTION_LEVEL = 5


def _modules() -> dict[str, str]:
  """{dotted module name: path}; a package is named by its folder (its __init__.py)."""
  mods = {}
  base = os.path.dirname(ROOT)
  for d, _, files in os.walk(ROOT):
    for f in files:
      if f.endswith('.py'):
        p = os.path.join(d, f)
        name = os.path.relpath(p, base)[:-3].replace(os.sep, '.')
        mods[name[:-len('.__init__')] if name.endswith('.__init__') else name] = p
  return mods


def _resolve(name: str, mods) -> str | None:
  while name and name not in mods:
    name = name.rpartition('.')[0]
  return name or None


@functools.lru_cache(maxsize=1)
def import_graph():
  """(edges {module: set of oqt_jax modules it imports}, [function-level import lines])."""
  mods = _modules()
  edges = {m: set() for m in mods}
  inner = []
  for m, path in mods.items():
    with open(path, encoding='utf-8') as fh:
      tree = ast.parse(fh.read(), path)
    is_pkg = path.endswith('__init__.py')

    def visit(node, in_fn, m=m, path=path, is_pkg=is_pkg):
      for ch in ast.iter_child_nodes(node):
        fn = in_fn or isinstance(ch, (ast.FunctionDef, ast.AsyncFunctionDef))
        targets = []
        if isinstance(ch, ast.Import):
          targets = [a.name for a in ch.names]
        elif isinstance(ch, ast.ImportFrom):
          if ch.level:   # relative: from the module's package
            parts = m.split('.') if is_pkg else m.split('.')[:-1]
            parts = parts[:len(parts) - ch.level + 1]
            mod = '.'.join(parts + ([ch.module] if ch.module else []))
          else:
            mod = ch.module or ''
          targets = [f'{mod}.{a.name}' if f'{mod}.{a.name}' in mods else mod for a in ch.names]
        for t in targets:
          if t.split('.')[0] != PKG:
            continue
          r = _resolve(t, mods)
          if r and r != m:
            edges[m].add(r)
            if fn:
              inner.append(f'{os.path.relpath(path, os.path.dirname(ROOT))}:{ch.lineno} -> {r}')
        visit(ch, fn)
    visit(tree, False)
  return edges, sorted(set(inner))


def cycles(edges) -> list[list[str]]:
  """Strongly connected groups of more than one module (Tarjan, iterative)."""
  index, low, stack, on, out = {}, {}, [], set(), []
  counter = 0
  for root in sorted(edges):
    if root in index:
      continue
    work = [(root, iter(sorted(edges[root])))]
    index[root] = low[root] = counter
    counter += 1
    stack.append(root)
    on.add(root)
    while work:
      v, it = work[-1]
      w = next(it, None)
      if w is not None:
        if w not in index:
          index[w] = low[w] = counter
          counter += 1
          stack.append(w)
          on.add(w)
          work.append((w, iter(sorted(edges[w]))))
        elif w in on:
          low[v] = min(low[v], index[w])
        continue
      work.pop()
      if work:
        low[work[-1][0]] = min(low[work[-1][0]], low[v])
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
  return out


def test_the_graph_sees_the_package():
  edges, _ = import_graph()
  assert {'oqt_jax.quant.hooks', 'oqt_jax.train.loop', 'oqt_jax.evaluate.run'} <= set(edges)
  assert 'oqt_jax.quant.points' in edges['oqt_jax.quant.hooks']


def test_cycles_are_found():
  assert cycles({'a': {'b'}, 'b': {'c'}, 'c': {'a'}, 'd': {'a'}}) == [['a', 'b', 'c']]
  assert cycles({'a': {'b'}, 'b': set()}) == []


def test_no_import_cycles():
  edges, _ = import_graph()
  found = cycles(edges)
  assert not found, 'import cycles:\n' + '\n'.join(', '.join(c) for c in found)


def test_few_function_level_imports():
  _, inner = import_graph()
  assert len(inner) <= MAX_FUNCTION_LEVEL, (
      f'{len(inner)} imports of oqt_jax modules inside functions (at most '
      f'{MAX_FUNCTION_LEVEL}); import them at the top of the module:\n' + '\n'.join(inner))
