"""Where the test suite's time goes: each test file's time beside the XLA work
it caused (tracing, lowering, compiling), printed as tables.

    python bench/suite_time.py                     # the suite as `make test` runs it
    python bench/suite_time.py tests/test_rar.py   # any pytest arguments
    python bench/suite_time.py --keep-records=DIR  # and keep the raw records

pytest runs with two recorders. A plugin (this module, ``-p``) records each
test phase's duration on the controller; a ``sitecustomize`` put first on
``PYTHONPATH`` (so it reaches the xdist workers and every Python process a
test starts: CLI runs, multi-process jobs, notebook kernels) listens to
``jax.monitoring``'s time spans of tracing a jaxpr, lowering it to MLIR and
compiling it, each tagged with the test that caused it
(``PYTEST_CURRENT_TEST``, which subprocesses inherit: a process a fixture
starts keeps the tag of the test it started in). A ``sitecustomize`` it
shadows still runs. A process started with its own ``PYTHONPATH`` (the
accelerator suite's smoke run) is not seen: its time counts as "rest".

"compile" includes reading a program back from the persistent cache (how
many were is counted apart). jax records a trace span for a top-level trace
only, and lowers and compiles outside traces, so the kinds do not overlap
in the suite; spans of one kind in one process that overlap (threads) are
merged, and the per-program table sums them as they came. "rest" is a
file's test time less its XLA work: running the programs, Python, process
starts, I/O, waits. Work in a test's subprocesses runs beside the test
process, so a file's XLA seconds can exceed its test time on a machine with
free cores. XLA work outside any test (collection) has its own row.
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
OUTSIDE = "(outside a test)"
# Not GENVIS_*: tests that clear the project's variables for a child keep it.
_DIR_ENV = "SUITE_TIME_RECORDS"
# jax.monitoring's event names (jax/_src/dispatch.py, compiler.py).
KINDS = {"/jax/core/compile/jaxpr_trace_duration": "trace",
         "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower",
         "/jax/core/compile/backend_compile_duration": "compile"}
CACHE_HIT = "/jax/compilation_cache/cache_hits"
_MARK = "# bench/suite_time.py's recorder"

# Written as sitecustomize.py: runs at the start of every Python process
# that inherits PYTHONPATH and listens once jax is imported, then runs the
# sitecustomize it shadows.
SITECUSTOMIZE = _MARK + '''
import importlib.abc, importlib.machinery, importlib.util, json, os, sys

_DIR = os.environ.get(%(env)r)
_KINDS = %(kinds)r


def _write(rec):
  rec["test"] = os.environ.get("PYTEST_CURRENT_TEST", "").rsplit(" (", 1)[0]
  rec["pid"] = os.getpid()
  with open(os.path.join(_DIR, "xla-%%d.jsonl" %% os.getpid()), "a") as f:
    f.write(json.dumps(rec) + "\\n")


def _span(event, start, end, **kw):
  if event in _KINDS:
    _write({"kind": _KINDS[event], "start": start, "end": end,
            "fun": str(kw.get("fun_name", ""))})


def _event(event, **kw):
  if event == %(hit)r:
    _write({"kind": "cache_hit"})


class _AfterJax(importlib.abc.MetaPathFinder):
  """Registers the listeners once jax's package has run (a find_spec that
  imports nothing leaves it waiting; jax not installed: its ImportError)."""

  def find_spec(self, name, path, target=None):
    if name != "jax":
      return None
    spec = importlib.machinery.PathFinder.find_spec(name, path)
    if spec is None or not hasattr(spec.loader, "exec_module"):
      return spec
    run = spec.loader.exec_module

    def exec_module(module):
      run(module)
      if self in sys.meta_path:
        sys.meta_path.remove(self)
        import jax.monitoring as m
        m.register_event_time_span_listener(_span)
        m.register_event_listener(_event)
    spec.loader.exec_module = exec_module
    return spec


if _DIR:
  sys.meta_path.insert(0, _AfterJax())


def _shadowed():
  """The first sitecustomize on sys.path that is not a recorder (a run
  inside a run has two on the path: the first records)."""
  for entry in sys.path:
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize",
                                                    [entry or "."])
    if spec is None or not spec.origin:
      continue
    try:
      with open(spec.origin) as f:
        if f.readline().rstrip("\\n") == %(mark)r:
          continue
    except (OSError, UnicodeDecodeError):
      pass
    return spec


_spec = _shadowed()
if _spec is not None:
  _spec.loader.exec_module(importlib.util.module_from_spec(_spec))
''' % {"env": _DIR_ENV, "kinds": KINDS, "hit": CACHE_HIT, "mark": _MARK}


def write_recorder(directory: str) -> str:
  """Writes the ``sitecustomize`` into ``directory``; returns it (the entry
  to put first on ``PYTHONPATH``, with ``SUITE_TIME_RECORDS`` naming the
  folder the records go to)."""
  with open(os.path.join(directory, "sitecustomize.py"), "w") as f:
    f.write(SITECUSTOMIZE)
  return directory


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

def covered_seconds(spans: list[tuple[float, float]]) -> float:
  """Seconds covered by ``spans`` ((start, end) pairs of one process and
  kind), each moment counted once: a span inside another adds nothing."""
  total, reach = 0.0, float("-inf")
  for start, end in sorted(spans):
    if end > reach:
      total += end - max(start, reach)
      reach = end
  return total


def file_of(nodeid: str) -> str:
  return nodeid.split("::", 1)[0] or OUTSIDE


def program_name(fun: str) -> str:
  """jax names a span's function bare when tracing it and as ``jit(name)``
  when lowering and compiling it: one name for the three."""
  return fun if fun.startswith("jit(") else f"jit({fun})"


def summarize(tests: list[dict], xla: list[dict]) -> dict:
  """Per test file: test seconds (phases summed), XLA seconds by kind
  (overlapping spans of one process merged), compiles and cache reads
  among them, and the rest (none for the XLA work outside tests); per
  program (``jit(name)``): seconds of each kind, spans summed as they came,
  and compiles. Returns {"files": {file: row}, "programs": {program: row},
  "totals": row}."""
  files = collections.defaultdict(collections.Counter)
  for t in tests:
    files[file_of(t["test"])]["test"] += t["secs"]
  spans = collections.defaultdict(list)
  programs = collections.defaultdict(collections.Counter)
  for r in xla:
    f = file_of(r["test"])
    if r["kind"] == "cache_hit":
      files[f]["cache_reads"] += 1
      continue
    spans[(f, r["pid"], r["kind"])].append((r["start"], r["end"]))
    program = programs[program_name(r["fun"])]
    program[r["kind"]] += r["end"] - r["start"]
    if r["kind"] == "compile":
      files[f]["compiles"] += 1
      program["count"] += 1
  for (f, _, kind), s in spans.items():
    files[f][kind] += covered_seconds(s)
  totals = collections.Counter()
  for name, row in files.items():
    if name != OUTSIDE:     # no test time there to take the XLA work from
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
         f"workers: XLA compile {t['compile']:.0f} s ({t['compiles']:.0f} "
         f"compiles, {t['cache_reads']:.0f} of them read back from the "
         f"persistent cache), trace {t['trace']:.0f} s, lower {t['lower']:.0f} s, "
         f"rest {t['rest']:.0f} s", "",
         "| test file | test s | compile s | trace s | lower s | rest s "
         "| compiles | cache reads |", "|---|---|---|---|---|---|---|---|"]
  files = sorted(summary["files"].items(), key=lambda kv: -kv[1]["test"])
  shown = [kv for kv in files if kv[0] != OUTSIDE][:top]
  shown += [kv for kv in files if kv[0] == OUTSIDE]     # always, last
  for name, r in shown:
    out.append(f"| {name} | {r['test']:.1f} | {r['compile']:.1f} | "
               f"{r['trace']:.1f} | {r['lower']:.1f} | {r['rest']:.1f} | "
               f"{r['compiles']:.0f} | {r['cache_reads']:.0f} |")
  out += ["", "| program | compile s | trace s | lower s | compiles |",
          "|---|---|---|---|---|"]
  progs = sorted(summary["programs"].items(),
                 key=lambda kv: -sum(kv[1][k] for k in KINDS.values()))
  for name, r in progs[:top]:
    out.append(f"| {name} | {r['compile']:.1f} | {r['trace']:.1f} | "
               f"{r['lower']:.1f} | {r['count']:.0f} |")
  return "\n".join(out)


def _from_here(arg: str) -> str:
  """A test path given relative to the caller's folder, made absolute (pytest
  runs from the repository root, as ``make test`` does)."""
  path = arg.split("::", 1)[0]
  if arg.startswith("-") or os.path.isabs(path) or not os.path.exists(path):
    return arg
  return os.path.abspath(path) + arg[len(path):]


def main(argv: list[str]) -> int:
  """Runs pytest with ``argv`` (``make test``'s arguments if none) and
  prints the tables. ``--keep-records=DIR`` (the tool's own, not passed to
  pytest) writes the raw records into ``DIR`` (new or empty) and keeps them:
  ``tests.jsonl`` (one line per test phase) and ``xla-<pid>.jsonl`` (one line
  per span or cache read, with its function and test)."""
  option = "--keep-records="
  keep = next((os.path.abspath(a[len(option):]) for a in reversed(argv)
               if a.startswith(option)), None)
  args = [_from_here(a) for a in argv if not a.startswith(option)] or MAKE_TEST
  if keep:
    if os.path.isdir(keep) and os.listdir(keep):
      print(f"--keep-records={keep} holds files already (an earlier run's "
            "records would be counted with this run's): give a new or empty "
            "folder.", file=sys.stderr)
      return 2
  with tempfile.TemporaryDirectory(prefix="suite-time-") as directory:
    records = keep or os.path.join(directory, "records")
    os.makedirs(records, exist_ok=True)
    site = write_recorder(directory)
    env = dict(os.environ, **{_DIR_ENV: records})
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (site, os.environ.get("PYTHONPATH")) if p)
    start = time.monotonic()
    rc = subprocess.call([sys.executable, "-m", "pytest", "-p",
                          "bench.suite_time", *args], cwd=ROOT, env=env)
    wall = time.monotonic() - start
    print(tables(summarize(*read_records(records)), wall))
  if keep:
    print(f"records kept in {keep}")
  return rc


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
