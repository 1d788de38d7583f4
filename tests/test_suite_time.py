"""bench/suite_time.py: the suite's time per test file beside the XLA work
its tests and their subprocesses caused."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from bench import suite_time as st


def _run_tool(args, tmp_path, env, timeout):
  """``python bench/suite_time.py ARGS`` from ``tmp_path``."""
  return subprocess.run([sys.executable, st.__file__, *args], cwd=tmp_path,
                        env=env, capture_output=True, text=True,
                        timeout=timeout)


def test_nested_spans_count_once():
  assert st.covered_seconds([]) == 0
  # (0, 10) holds (2, 3) and (4, 12) reaches past it; (20, 21) stands apart.
  assert st.covered_seconds([(4, 12), (0, 10), (2, 3), (20, 21)]) == 13


def test_summary_splits_each_files_time():
  a, b = "tests/test_a.py::t1", "tests/test_b.py::t[x]"
  tests = [{"test": a, "when": "setup", "secs": 1.0},
           {"test": a, "when": "call", "secs": 10.0},
           {"test": b, "when": "call", "secs": 4.0}]
  span = lambda test, kind, start, end, pid=1, fun="f": dict(
      test=test, kind=kind, start=start, end=end, pid=pid, fun=fun)
  # A program's trace span names its function bare, its lower and compile
  # spans jit(name): one row for the three.
  xla = [span(a, "trace", 0, 2, fun="step"),
         span(a, "trace", 0.5, 1, fun="step"),                    # nested
         span(a, "lower", 2, 3, fun="jit(step)"),
         span(a, "compile", 3, 6, fun="jit(step)"),
         span(a, "compile", 0, 2, pid=2, fun="jit(step)"),       # subprocess
         span(b, "compile", 0, 1, fun="jit(g)"),
         {"test": b, "kind": "cache_hit", "pid": 1}]
  s = st.summarize(tests, xla)
  ra, rb = s["files"]["tests/test_a.py"], s["files"]["tests/test_b.py"]
  assert (ra["test"], ra["trace"], ra["lower"], ra["compile"]) == (11, 2, 1, 5)
  assert ra["rest"] == 3 and ra["compiles"] == 2 and ra["cache_reads"] == 0
  assert (rb["compile"], rb["rest"], rb["cache_reads"]) == (1, 3, 1)
  # Per program the spans add up as they came (the nested trace too).
  assert s["programs"]["jit(step)"] == {"trace": 2.5, "lower": 1,
                                        "compile": 5, "count": 2}
  assert set(s["programs"]) == {"jit(step)", "jit(g)"}
  assert s["totals"]["test"] == 15 and s["totals"]["compiles"] == 3
  # Collection's XLA work: its own row, last, with no rest.
  outside = st.summarize(tests, xla + [span("", "compile", 0, 7)])
  assert outside["files"][st.OUTSIDE]["rest"] == 0
  assert outside["totals"]["rest"] == s["totals"]["rest"]
  assert st.tables(outside, 9.0, top=1).splitlines()[-5].startswith(
      f"| {st.OUTSIDE} | 0.0 | 7.0 |")
  table = st.tables(s, wall=9.0)
  assert table.startswith("wall 9 s; test time 15 s")
  assert "| tests/test_a.py | 11.0 | 5.0 | 2.0 | 1.0 | 3.0 | 2 | 0 |" in table
  assert "| jit(step) | 5.0 | 2.5 | 1.0 | 2 |" in table
  # Ordered by all their XLA seconds.
  assert table.index("| jit(step) |") < table.index("| jit(g) |")


def test_a_run_sees_the_programs_of_tests_and_their_subprocesses(tmp_path):
  (tmp_path / "test_tiny.py").write_text(textwrap.dedent("""
      import subprocess, sys
      import jax

      def test_in_process():
        assert int(jax.jit(lambda x: x * 3)(2)) == 6

      def test_in_a_subprocess():
        # A look for jax before importing it (as libraries do) loses nothing.
        subprocess.run([sys.executable, "-c",
                        "import importlib.util; importlib.util.find_spec('jax');"
                        "import jax; jax.jit(lambda x: x + 41)(1)"], check=True)
  """))
  # A cache of its own (none: every program compiles); xdist as make test;
  # a sitecustomize of the user's, which the recorder's must not hide.
  env = {k: v for k, v in os.environ.items()
         if k not in ("JAX_COMPILATION_CACHE_DIR", "PYTEST_XDIST_WORKER")}
  users = tmp_path / "users_site"
  users.mkdir()
  (users / "sitecustomize.py").write_text(
      "import os\nopen(os.path.join(%r, 'ran_%%d' %% os.getpid()), 'w')\n"
      % str(users))
  env["PYTHONPATH"] = str(users)
  kept = tmp_path / "kept"
  out = _run_tool([str(tmp_path / "test_tiny.py"), "-q", "-n", "2",
                  f"--keep-records={kept}", "-p", "no:cacheprovider"],
                  tmp_path, env, timeout=300)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  # The file's row (named from pytest's rootdir, which depends on the
  # folders above tmp_path).
  row = [l for l in out.stdout.splitlines() if l.endswith("|")
         and "test_tiny.py |" in l]
  assert len(row) == 1, out.stdout
  cells = [c.strip() for c in row[0].strip("|").split("|")]
  assert float(cells[1]) > 0 and cells[6] == "2", row   # both programs
  assert "| jit(<lambda>) |" in out.stdout
  assert "2 passed" in out.stdout
  # In the tool's, pytest's (the controller, 2 workers) and the test's child.
  assert len(list(users.glob("ran_*"))) == 5
  # The raw records, kept as asked: each test's phases (the option not
  # passed on to pytest), and the two programs' spans tagged with their
  # tests; a second run into the same folder is refused before it starts.
  tests, xla = st.read_records(str(kept))
  assert {t["test"].split("::")[1] for t in tests} == {
      "test_in_process", "test_in_a_subprocess"}
  assert {r["test"].split("::")[1] for r in xla
          if r["kind"] == "compile"} == {"test_in_process",
                                         "test_in_a_subprocess"}
  assert f"records kept in {kept}" in out.stdout
  again = _run_tool([f"--keep-records={kept}", "-q"], tmp_path, env, 60)
  assert again.returncode == 2 and "holds files already" in again.stderr
  assert "passed" not in again.stdout


def _python(code, tmp_path, pythonpath, records=None):
  env = {k: v for k, v in os.environ.items() if k != "SUITE_TIME_RECORDS"}
  env["PYTHONPATH"] = os.pathsep.join(str(p) for p in pythonpath)
  if records:
    env["SUITE_TIME_RECORDS"] = str(records)
  return subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path,
                        capture_output=True, text=True, timeout=120)


def test_the_recorder_in_odd_processes(tmp_path):
  """Two recorders on the path (a run inside a run) record once and do not
  run each other; without its records folder a recorder does nothing; where
  jax is not installed, importing it raises ImportError as before."""
  sites = []
  for name in ("s1", "s2"):
    (tmp_path / name).mkdir()
    sites.append(st.write_recorder(str(tmp_path / name)))
  records = tmp_path / "records"
  records.mkdir()
  jit = "import jax; jax.jit(lambda x: x * 7)(1)"
  out = _python(jit, tmp_path, sites, records)
  assert out.returncode == 0 and "sitecustomize" not in out.stderr, out.stderr
  kinds = sorted(json.loads(l)["kind"] for f in records.iterdir()
                 for l in f.read_text().splitlines())
  assert kinds == ["compile", "lower", "trace"], kinds
  out = _python(jit, tmp_path, sites[:1])           # no SUITE_TIME_RECORDS
  assert out.returncode == 0 and not out.stderr.strip(), out.stderr
  no_jax = ("import sys\nsys.path = [p for p in sys.path if 'site-packages' "
            "not in p]\ntry:\n  import jax\nexcept ImportError:\n"
            "  print('no jax')")
  out = _python(no_jax, tmp_path, sites[:1], records)
  assert out.stdout.strip() == "no jax" and not out.stderr.strip(), out.stderr


@pytest.mark.parametrize("rc", [0, 3])
def test_the_exit_code_is_pytests(tmp_path, rc):
  (tmp_path / "test_x.py").write_text(
      f"def test_x():\n  assert {rc} == 0\n")
  env = {k: v for k, v in os.environ.items() if k != "PYTEST_XDIST_WORKER"}
  env.pop("PYTHONPATH", None)     # a recorder of a run around this one
  out = _run_tool([str(tmp_path / "test_x.py"), "-q", "-p", "no:cacheprovider"],
                  tmp_path, env, timeout=120)
  assert out.returncode == (0 if rc == 0 else 1), out.stdout[-2000:]
  assert "test_x.py | " in out.stdout, out.stdout
