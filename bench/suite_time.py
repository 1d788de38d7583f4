"""Where the test suite's time goes: each test file's time beside the XLA work
it caused (tracing, lowering, compiling), printed as tables.

    python bench/suite_time.py                     # the suite as `make test` runs it
    python bench/suite_time.py tests/test_rar.py   # any pytest arguments

pytest runs with two recorders. A plugin (this module, ``-p``) records each
test phase's duration on the controller; a ``sitecustomize`` put first on
``PYTHONPATH`` (so it reaches the xdist workers and every Python process a
test starts: CLI runs, multi-process jobs, notebook kernels) listens to
``jax.monitoring``'s time spans of tracing a jaxpr, lowering it to MLIR and
compiling it (a persistent-cache read included: those are counted apart),
each tagged with the test that caused it (``PYTEST_CURRENT_TEST``, which
subprocesses inherit); a ``sitecustomize`` it shadows still runs. A process
started with its own ``PYTHONPATH`` (the accelerator suite's smoke run) is
not seen: its time counts as "rest".

Spans nested in a span of the same kind and process (a jit traced while an
outer one is traced) are counted once, in the outer one. "rest" is a file's
test time less its XLA work: running the programs, Python, process starts,
I/O, waits. Work in a test's subprocesses runs beside the test process, so
a file's XLA seconds can exceed its test time on a machine with free cores.
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAKE_TEST = ["tests", "-n", "2", "--dist=loadfile", "--no-loadscope-reorder"]
_DIR_ENV = "GENVIS_SUITE_TIME_DIR"
# jax.monitoring's event names (jax/_src/dispatch.py, compiler.py).
KINDS = {"/jax/core/compile/jaxpr_trace_duration": "trace",
         "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower",
         "/jax/core/compile/backend_compile_duration": "compile"}
CACHE_HIT = "/jax/compilation_cache/cache_hits"

# Written as sitecustomize.py: runs at the start of every Python process
# that inherits PYTHONPATH, and listens once jax is imported.
SITECUSTOMIZE = '''
import importlib.abc, importlib.machinery, importlib.util, json, os, sys

_OUT = os.path.join(os.environ["%(env)s"], "xla-%%d.jsonl" %% os.getpid())
_KINDS = %(kinds)r


def _write(rec):
  rec["test"] = os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" (", 1)[0]
  rec["pid"] = os.getpid()
  with open(_OUT, "a") as f:
    f.write(json.dumps(rec) + "\\n")


def _span(event, start, end, **kw):
  if event in _KINDS:
    _write({"kind": _KINDS[event], "start": start, "end": end,
            "fun": str(kw.get("fun_name", ""))})


def _event(event, **kw):
  if event == %(hit)r:
    _write({"kind": "cache_hit"})


class _AfterJax(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path, target=None):
    if name != "jax":
      return None
    sys.meta_path.remove(self)
    spec = importlib.util.find_spec(name)
    run = spec.loader.exec_module

    def exec_module(module):
      run(module)
      import jax.monitoring as m
      m.register_event_time_span_listener(_span)
      m.register_event_listener(_event)
    spec.loader.exec_module = exec_module
    return spec


sys.meta_path.insert(0, _AfterJax())

# The sitecustomize this one shadows (a user's or the environment's), run as
# Python would have run it.
_here = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.machinery.PathFinder.find_spec("sitecustomize", [
    p for p in sys.path if os.path.abspath(p or ".") != _here])
if _spec is not None:
  _spec.loader.exec_module(importlib.util.module_from_spec(_spec))
''' % {"env": _DIR_ENV, "kinds": KINDS, "hit": CACHE_HIT}


# -- the pytest plugin (``-p bench.suite_time``) ------------------------------

_tests_file = None


def pytest_configure(config):
  global _tests_file
  # With xdist the controller receives every worker's reports; a worker
  # writes none of its own (each report would be counted twice).
  if _DIR_ENV in os.environ and not hasattr(config, "workerinput"):
    _tests_file = os.path.join(os.environ[_DIR_ENV], "tests.jsonl")


def pytest_runtest_logreport(report):
  if _tests_file is None:
    return
  with open(_tests_file, "a") as f:
    f.write(json.dumps({"test": report.nodeid, "when": report.when,
                        "secs": report.duration,
                        "outcome": report.outcome}) + "\n")


# -- reading the records --------------------------------------------------------

def outermost_seconds(spans: list[tuple[float, float]]) -> float:
  """Seconds covered by ``spans`` ((start, end) pairs of one process and
  kind), each moment counted once: a span inside another adds nothing."""
  total, reach = 0.0, float("-inf")
  for start, end in sorted(spans):
    if end > reach:
      total += end - max(start, reach)
      reach = end
  return total


def file_of(nodeid: str) -> str:
  return nodeid.split("::", 1)[0] or "(outside a test)"


def summarize(tests: list[dict], xla: list[dict]) -> dict:
  """Per test file: test seconds (phases summed), XLA seconds by kind
  (outermost spans per process), programs compiled and cache reads; per
  program name: compile seconds and count. Returns {"files": {file: row},
  "programs": {fun: row}, "totals": row}."""
  files = collections.defaultdict(lambda: collections.Counter())
  for t in tests:
    files[file_of(t["test"])]["test"] += t["secs"]
  spans = collections.defaultdict(list)
  programs = collections.defaultdict(lambda: collections.Counter())
  for r in xla:
    f = file_of(r["test"])
    if r["kind"] == "cache_hit":
      files[f]["cache_reads"] += 1
      continue
    spans[(f, r["pid"], r["kind"])].append((r["start"], r["end"]))
    if r["kind"] == "compile":
      files[f]["programs"] += 1
      programs[r["fun"]]["compile"] += r["end"] - r["start"]
      programs[r["fun"]]["count"] += 1
  for (f, _, kind), s in spans.items():
    files[f][kind] += outermost_seconds(s)
  totals = collections.Counter()
  for row in files.values():
    row["rest"] = row["test"] - row["trace"] - row["lower"] - row["compile"]
    totals.update(row)
  return {"files": dict(files), "programs": dict(programs), "totals": totals}


def read_records(directory: str) -> tuple[list[dict], list[dict]]:
  def lines(path):
    with open(path) as f:
      return [json.loads(l) for l in f if l.strip()]
  names = os.listdir(directory)
  tests = lines(os.path.join(directory, "tests.jsonl")) if (
      "tests.jsonl" in names) else []
  xla = [r for n in names if n.startswith("xla-")
         for r in lines(os.path.join(directory, n))]
  return tests, xla


def tables(summary: dict, wall: float, top: int = 25) -> str:
  t = summary["totals"]
  out = [f"wall {wall:.0f} s; test time {t['test']:.0f} s summed over the "
         f"workers: XLA compile {t['compile']:.0f} s ({t['programs']:.0f} "
         f"programs; {t['cache_reads']:.0f} read back from the persistent "
         f"cache), trace {t['trace']:.0f} s, lower {t['lower']:.0f} s, "
         f"rest {t['rest']:.0f} s", "",
         "| test file | test s | compile s | trace s | lower s | rest s "
         "| programs | cache reads |", "|---|---|---|---|---|---|---|---|"]
  files = sorted(summary["files"].items(), key=lambda kv: -kv[1]["test"])
  for name, r in files[:top]:
    out.append(f"| {name} | {r['test']:.1f} | {r['compile']:.1f} | "
               f"{r['trace']:.1f} | {r['lower']:.1f} | {r['rest']:.1f} | "
               f"{r['programs']:.0f} | {r['cache_reads']:.0f} |")
  out += ["", "| program | compile s | compiles |", "|---|---|---|"]
  progs = sorted(summary["programs"].items(), key=lambda kv: -kv[1]["compile"])
  for name, r in progs[:top]:
    out.append(f"| {name} | {r['compile']:.1f} | {r['count']:.0f} |")
  return "\n".join(out)


def main(argv: list[str]) -> int:
  args = argv or MAKE_TEST
  with tempfile.TemporaryDirectory(prefix="suite-time-") as directory:
    site = os.path.join(directory, "site")
    records = os.path.join(directory, "records")
    os.makedirs(site)
    os.makedirs(records)
    with open(os.path.join(site, "sitecustomize.py"), "w") as f:
      f.write(SITECUSTOMIZE)
    env = dict(os.environ, **{_DIR_ENV: records})
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (site, ROOT, os.environ.get("PYTHONPATH")) if p)
    start = time.monotonic()
    rc = subprocess.call([sys.executable, "-m", "pytest", "-p",
                          "bench.suite_time", *args], cwd=ROOT, env=env)
    wall = time.monotonic() - start
    print(tables(summarize(*read_records(records)), wall))
  return rc


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
