"""Shared by the multi-host tests and their worker processes: the classifier
config they train, and starting N processes joined by ``jax.distributed`` on
localhost (each with its own fake CPU devices, gloo collectives)."""

from __future__ import annotations

import os
import socket
import subprocess

import ml_collections

from configs import base
from tests import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def config(num_steps: int):
  c = base.get_config()
  c.task = "classifier"
  c.model = ml_collections.ConfigDict(dict(
      name="classifier", num_classes=10, widths=(8, 16), image_size=32,
      dtype="float32", param_dtype="float32", remat="none"))
  c.data.source = "demo"
  c.data.image_size = 32
  c.data.num_classes = 10
  c.mesh.shape = ml_collections.ConfigDict(dict(data=-1, fsdp=2, tensor=1))
  c.train.global_batch_size = 16
  c.train.num_steps = num_steps
  c.train.log_every = 1
  c.train.checkpoint_every = 2
  c.train.image_every = 0
  c.train.ema_decay = 0.9
  # SGD: Adam maps round-off-level gradients to +-lr updates, which would hide
  # real differences in a 1e-5 comparison.
  c.optimizer.name = "sgd"
  c.optimizer.lr = 1e-1
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
  the repository root; asserts that each exits 0 and returns their logs."""
  port = free_port()
  procs = [subprocess.Popen(
      cmd, cwd=ROOT, env=process_env(i, len(commands), port, local_devices),
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i, cmd in enumerate(commands)]
  try:
    logs = [p.communicate(timeout=timeout)[0] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  for i, (p, log) in enumerate(zip(procs, logs)):
    assert p.returncode == 0, f"process {i}:\n{log[-4000:]}"
  return logs
