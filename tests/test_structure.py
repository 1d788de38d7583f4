"""The package's layering, read from its import statements (no imports run).

core <- kernels <- models <- data, convert <- sample <- evaluate <- train <- main
"""

import os

import pytest

from bench import code_structure as cs

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                    "genvis_jax")


@pytest.fixture(scope="module")
def graph():
  edges, deferred, _ = cs.import_graph(ROOT)
  return {m: edges[m] | deferred[m] for m in edges}, edges


def _imports_of(every, prefix):
  return {(m, d) for m, deps in every.items() if m.startswith(prefix)
          for d in deps}


def test_core_imports_nothing_above_it(graph):
  every, _ = graph
  bad = {(m, d) for m, d in _imports_of(every, "genvis_jax.core")
         if not d.startswith(("genvis_jax.core", "genvis_jax.errors"))}
  assert not bad, f"core must import only core and errors: {sorted(bad)}"


def test_train_is_imported_only_by_the_entry_points(graph):
  every, _ = graph
  bad = {(m, d) for m, deps in every.items() for d in deps
         if d.startswith("genvis_jax.train")
         and not m.startswith(("genvis_jax.train", "genvis_jax.main"))}
  assert not bad, f"only genvis_jax.main may import train: {sorted(bad)}"


def test_models_do_not_read_files_or_import_layers_above(graph):
  every, _ = graph
  above = ("genvis_jax.convert", "genvis_jax.train", "genvis_jax.sample",
           "genvis_jax.evaluate", "genvis_jax.data")
  bad = {(m, d) for m, d in _imports_of(every, "genvis_jax.models")
         if d.startswith(above)}
  assert not bad, f"models import only core, kernels and models: {sorted(bad)}"


# Each package imports only packages of a lower rank (and errors / cli).
RANK = {"core": 0, "kernels": 1, "models": 2, "data": 3, "convert": 3,
        "sample": 4, "evaluate": 5, "train": 6}


def _package(module):
  parts = module.split(".")
  return parts[1] if len(parts) > 1 and parts[1] in RANK else None


def test_each_package_imports_only_lower_layers(graph):
  every, _ = graph
  bad = sorted((m, d) for m, deps in every.items() for d in deps
               if _package(m) and _package(d) and _package(m) != _package(d)
               and RANK[_package(d)] >= RANK[_package(m)])
  assert not bad, f"imports of a layer at or above: {bad} (order: {RANK})"


def test_no_import_cycles(graph):
  every, edges = graph
  assert cs.cycles(edges) == []
  assert cs.cycles(cs.layer_edges(every)) == []


def test_cycle_finder_sees_a_cycle():
  assert cs.cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [
      ["a", "b", "c"]]
