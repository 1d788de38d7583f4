"""Structure numbers of the ``genvis_jax`` package, printed as a table.

    python bench/code_structure.py [--root genvis_jax]

Counts what makes a codebase hard to carry on: imports inside functions (a
sign of layers that import each other), module-level import cycles between
the package's top-level layers and between its modules, the largest files and
the total number of lines. The layering rules the package keeps (``core``
imports nothing above it; ``train`` is imported only by the entry points) are
checked by ``tests/test_structure.py`` with the same graph.
"""

from __future__ import annotations

import argparse
import ast
import gc
import os
import sys


def module_name(root: str, path: str) -> str:
  rel = os.path.relpath(path, os.path.dirname(root))[:-3].replace(os.sep, ".")
  return rel[:-len(".__init__")] if rel.endswith(".__init__") else rel


def python_files(root: str) -> list[str]:
  out = []
  for d, _, files in os.walk(root):
    out += [os.path.join(d, f) for f in files if f.endswith(".py")]
  return sorted(out)


def _imported(node: ast.AST, current: str, is_pkg: bool) -> list[str]:
  """Absolute module names an import statement names (relative resolved)."""
  if isinstance(node, ast.Import):
    return [a.name for a in node.names]
  if isinstance(node, ast.ImportFrom):
    base = node.module or ""
    if node.level:
      parts = current.split(".")
      parts = parts if is_pkg else parts[:-1]
      parts = parts[:len(parts) - node.level + 1]
      base = ".".join(parts + ([base] if base else []))
    # ``from pkg import mod`` may name a submodule: keep both candidates
    # (``import_graph`` drops the package when every name is a submodule).
    return [base] + [f"{base}.{a.name}" for a in node.names]
  return []


def _parse(path: str) -> ast.Module:
  """``ast.parse`` with the garbage collector paused.

  In CPython 3.11 a collection during parsing that runs a finalizer which
  parses too (asyncio logging an unretrieved task's traceback) breaks the
  outer parse with "AST constructor recursion depth mismatch" (gh-106905).
  """
  with open(path, encoding="utf-8") as f:
    source = f.read()
  enabled = gc.isenabled()
  gc.disable()
  try:
    return ast.parse(source, path)
  finally:
    if enabled:
      gc.enable()


def import_graph(root: str):
  """(module-level edges, function-level edges, function-level import count).

  Edges: {module: set of package modules it imports}, counting only names
  that are modules of the package. Imports under ``if TYPE_CHECKING`` are not
  edges (they do not run).
  """
  files = python_files(root)
  mods = {module_name(root, f): f for f in files}
  pkg = os.path.basename(root.rstrip(os.sep))
  edges: dict[str, set[str]] = {m: set() for m in mods}
  deferred: dict[str, set[str]] = {m: set() for m in mods}
  inner = 0
  for mod, path in mods.items():
    tree = _parse(path)
    is_pkg = path.endswith("__init__.py")

    def visit(node, depth):
      nonlocal inner
      for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.dump(child.test):
          continue
        if isinstance(child, (ast.Import, ast.ImportFrom)):
          names = [n for n in _imported(child, mod, is_pkg)
                   if n.split(".")[0] == pkg]
          subs = [f"{child.module}.{a.name}" for a in child.names] if (
              isinstance(child, ast.ImportFrom) and not child.level
              and child.module) else []
          if subs and all(n in mods for n in subs):
            names = subs
          names = {n for n in names if n in mods and n != mod}
          if depth:
            inner += bool(names)
            deferred[mod].update(names)
          else:
            edges[mod].update(names)
        nested = isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
        visit(child, depth + nested)
    visit(tree, 0)
  return edges, deferred, inner


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
  """Strongly connected components with more than one node (Tarjan)."""
  index, low, stack, on, out = {}, {}, [], set(), []
  counter = [0]
  sys.setrecursionlimit(10000)

  def strong(v):
    index[v] = low[v] = counter[0]
    counter[0] += 1
    stack.append(v)
    on.add(v)
    for w in edges.get(v, ()):
      if w not in index:
        strong(w)
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
  for v in sorted(edges):
    if v not in index:
      strong(v)
  return out


def layer_edges(edges: dict[str, set[str]]) -> dict[str, set[str]]:
  """The graph collapsed to top-level layers (``genvis_jax.<layer>``)."""
  def layer(m):
    parts = m.split(".")
    return ".".join(parts[:2])
  out: dict[str, set[str]] = {}
  for m, deps in edges.items():
    out.setdefault(layer(m), set()).update(
        layer(d) for d in deps if layer(d) != layer(m))
  return out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--root", default=os.path.join(
      os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "genvis_jax"))
  args = p.parse_args(argv)
  if not os.path.isdir(args.root):
    p.error(f"--root={args.root}: no such folder")
  files = python_files(args.root)
  lines = {f: sum(1 for _ in open(f, encoding="utf-8")) for f in files}
  edges, deferred, inner = import_graph(args.root)
  every = {m: edges[m] | deferred[m] for m in edges}
  mod_cycles = cycles(edges)
  lay_cycles = cycles(layer_edges(every))
  biggest = sorted(lines.items(), key=lambda kv: -kv[1])[:3]
  rel = lambda f: os.path.relpath(f, os.path.dirname(args.root))
  rows = [
      ("python files", len(files)),
      ("total lines", sum(lines.values())),
      ("largest files", ", ".join(f"{rel(f)} ({n})" for f, n in biggest)),
      ("files over 450 lines", sum(n > 450 for n in lines.values())),
      ("function-level imports of the package", inner),
      ("module import cycles", len(mod_cycles)),
      ("layer import cycles (function-level imports too)", len(lay_cycles)),
  ]
  width = max(len(r[0]) for r in rows)
  print(f"| {'what':<{width}} | value |")
  print(f"|{'-' * (width + 2)}|-------|")
  for k, v in rows:
    print(f"| {k:<{width}} | {v} |")
  for c in mod_cycles + lay_cycles:
    print("cycle:", " <-> ".join(c))


if __name__ == "__main__":
  main()
