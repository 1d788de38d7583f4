"""``python -m genvis_jax.main ARGS`` without paying the imports per command.

A server process imports the libraries once (no jax backend, no thread is
started by an import: checked at start), then forks one child per command;
the child runs ``genvis_jax.main`` as ``__main__`` (``runpy``: flags defined
and parsed afresh, as in a new interpreter) with its stdout / stderr in files.
An error path of the command line costs its own work (0.1-1 s) instead of
about 2.5 s of imports. Tests use ``Runner``; the server side is ``serve``.
"""

import importlib
import json
import os
import runpy
import signal
import subprocess
import sys
import threading
from types import SimpleNamespace

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _child(args, env, out_prefix, timeout):
  os.environ.update(env)
  for fd, suffix in ((1, ".out"), (2, ".err")):
    f = os.open(out_prefix + suffix, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(f, fd)
    os.close(f)
  signal.alarm(timeout)
  sys.argv = ["genvis_jax.main", *args]
  code = 0
  try:
    runpy.run_module("genvis_jax.main", run_name="__main__", alter_sys=True)
  except SystemExit as e:
    code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
  except BaseException:   # pylint: disable=broad-except
    import traceback  # pylint: disable=import-outside-toplevel
    traceback.print_exc()
    code = 1
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(code)   # pylint: disable=protected-access


def serve():
  """Reads one JSON request per line ({"args", "env", "out", "timeout"}) and
  answers each with the child's exit status (negative: killed by a signal)."""
  # What the commands import; genvis_jax.main itself is left to each child.
  for name in ("jax", "genvis_jax.cli", "genvis_jax.modes",
               "genvis_jax.train.trainer"):
    importlib.import_module(name)
  from jax._src import xla_bridge  # pylint: disable=import-outside-toplevel
  assert threading.active_count() == 1 and not xla_bridge._backends  # pylint: disable=protected-access
  reply = os.fdopen(os.dup(1), "w")
  for line in sys.stdin:
    req = json.loads(line)
    pid = os.fork()
    if pid == 0:
      _child(req["args"], req["env"], req["out"], req["timeout"])
    status = os.waitpid(pid, 0)[1]
    reply.write(f"{os.waitstatus_to_exitcode(status)}\n")
    reply.flush()


class Runner:
  """``run(args, out_prefix, env=None, timeout=120)`` -> namespace with
  ``returncode``, ``stdout``, ``stderr``, as ``subprocess.run`` gives."""

  def __init__(self, env):
    self._proc = subprocess.Popen(
        [sys.executable, "-c", "from tests import cli_runner; cli_runner.serve()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO,
        env=env)

  def run(self, args, out_prefix, env=None, timeout=120):
    self._proc.stdin.write(json.dumps(dict(args=list(args), env=env or {},
                                           out=str(out_prefix),
                                           timeout=timeout)) + "\n")
    self._proc.stdin.flush()
    line = self._proc.stdout.readline()
    if not line:
      raise RuntimeError(f"the command server ended (exit {self._proc.wait()})")
    read = lambda suffix: open(str(out_prefix) + suffix, encoding="utf-8").read()
    return SimpleNamespace(returncode=int(line), stdout=read(".out"),
                           stderr=read(".err"))

  def close(self):
    self._proc.stdin.close()
    self._proc.wait(timeout=30)
