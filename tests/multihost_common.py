"""Shared by the multi-host tests and their worker processes: the classifier
config they train, and starting N processes joined by ``jax.distributed`` on
localhost (each with its own fake CPU devices, gloo collectives)."""

from __future__ import annotations

import os
import socket
import subprocess
import tempfile
import time

from tests import small_run
from tests import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def config(num_steps: int):
  """``small_run.config`` logged every step and saved every 2 steps, with
  SGD: Adam maps round-off-level gradients to +-lr updates, which would hide
  real differences in a 1e-5 comparison."""
  c = small_run.config(num_steps, lr=1e-1)
  c.train.log_every = 1
  c.train.checkpoint_every = 2
  c.optimizer.name = "sgd"
  return c


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def process_env(index: int, count: int, port: int,
                local_devices: int) -> dict[str, str]:
  """This environment as process ``index`` of ``count`` sees it: the
  variables ``genvis_jax.train.distributed.maybe_initialize`` reads and
  ``local_devices`` fake CPU devices."""
  env = dict(os.environ)
  env.update(JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
             JAX_NUM_PROCESSES=str(count), JAX_PROCESS_ID=str(index),
             JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(local_devices))
  return env


def run_processes(commands: list[list[str]], local_devices: int = 4,
                  timeout: float = 400) -> list[str]:
  """Runs ``commands[i]`` as process i of ``len(commands)``, all at once from
  the repository root; returns their logs.

  Fails (``AssertionError`` with every process's exit code and log tail) as
  soon as one process exits non-zero, killing the others (which would wait
  in their next collective for the one that died), or at ``timeout``
  seconds. Logs go to files, so a chatty process never blocks on a pipe."""
  port = free_port()
  with tempfile.TemporaryDirectory() as tmp:
    paths = [os.path.join(tmp, f"process{i}.log") for i in range(len(commands))]
    procs = []
    for i, cmd in enumerate(commands):
      with open(paths[i], "w") as log:
        procs.append(subprocess.Popen(
            cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
            env=process_env(i, len(commands), port, local_devices)))
    deadline = time.monotonic() + timeout
    try:
      while (any(p.poll() is None for p in procs)
             and not any(p.returncode for p in procs)
             and time.monotonic() < deadline):
        time.sleep(0.2)
    finally:
      timed_out = any(p.poll() is None for p in procs)
      for p in procs:
        if p.poll() is None:
          p.kill()
          p.wait()
    logs = [open(path).read() for path in paths]
  if timed_out or any(p.returncode for p in procs):
    what = (f"timed out after {timeout:.0f} s" if timed_out and not any(
        p.returncode > 0 for p in procs) else "failed")
    raise AssertionError(f"{len(procs)} processes {what}:\n" + "\n".join(
        f"--- process {i}: exit {p.returncode}\n{log[-3000:]}"
        for i, (p, log) in enumerate(zip(procs, logs))))
  return logs
