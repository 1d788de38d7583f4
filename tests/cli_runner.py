"""``python -m genvis_jax.main ARGS`` without paying the imports per command.

A server process imports what ``genvis_jax/main.py`` imports at its top (no
jax backend, no thread: checked at start; nothing more, so no other module's
flags or import-time effects), then forks one child per command. The child
runs ``genvis_jax.main`` as ``__main__`` (``runpy``: its flags defined and
parsed afresh, as in a new interpreter) with stdout / stderr in files, and
ends as that interpreter would: through ``SystemExit`` or an uncaught
exception, atexit hooks, logging's shutdown and the join of leftover threads
included. An error path of the command line then costs its own work (0.1-1 s)
instead of about 2.5 s of imports. Environment variables given per command
apply where they are read at run time; jax's ``JAX_*`` settings are read
when the server imports jax, so they are refused per command (give them to
the ``Runner``). Tests use ``Runner``; the server side is ``serve``.
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

# genvis_jax/main.py's imports before its flags are parsed.
MAIN_IMPORTS = ("absl.app", "ml_collections.config_flags", "genvis_jax.cli",
                "genvis_jax.cpu_malloc", "genvis_jax.modes",
                "genvis_jax.core.interrupts", "genvis_jax.core.preemption")


def _child(args, env, out_prefix, timeout):
  """The forked command: never returns (raises SystemExit or its error)."""
  os.environ.update(env)
  for fd, suffix in ((1, ".out"), (2, ".err")):
    f = os.open(out_prefix + suffix, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(f, fd)
    os.close(f)
  signal.alarm(timeout)
  sys.argv = ["genvis_jax.main", *args]
  runpy.run_module("genvis_jax.main", run_name="__main__", alter_sys=True)
  sys.exit(0)


def serve():
  """Reads one JSON request per line ({"args", "env", "out", "timeout"}) and
  answers each with the child's exit status (negative: killed by a signal)."""
  for name in MAIN_IMPORTS:
    importlib.import_module(name)
  from jax._src import xla_bridge  # pylint: disable=import-outside-toplevel
  assert threading.active_count() == 1 and not xla_bridge._backends  # pylint: disable=protected-access
  assert "genvis_jax.main" not in sys.modules
  reply = os.fdopen(os.dup(1), "w")
  for line in sys.stdin:
    req = json.loads(line)
    pid = os.fork()
    if pid == 0:
      reply.close()
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
    if any(k.startswith("JAX_") for k in env or {}):
      raise ValueError(f"{sorted(env)}: JAX_* settings are read when the "
                       "server imports jax; give them to the Runner.")
    self._proc.stdin.write(json.dumps(dict(args=list(args), env=env or {},
                                           out=str(out_prefix),
                                           timeout=timeout)) + "\n")
    self._proc.stdin.flush()
    line = self._proc.stdout.readline()
    if not line:
      raise RuntimeError(f"the command server ended (exit {self._proc.wait()})")
    read = lambda suffix: open(str(out_prefix) + suffix, encoding="utf-8").read()
    if int(line) == -signal.SIGALRM:   # as subprocess.run(timeout=...)
      raise subprocess.TimeoutExpired(["genvis_jax.main", *args], timeout,
                                      read(".out"), read(".err"))
    return SimpleNamespace(returncode=int(line), stdout=read(".out"),
                           stderr=read(".err"))

  def close(self):
    self._proc.stdin.close()
    self._proc.wait(timeout=30)
