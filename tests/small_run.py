"""The smallest resumable training run (a classifier on the demo data, 8
fake devices, checkpoints every 3 steps) and its workdirs, shared by the
checkpoint, reliability, stop and multi-host tests (``base_run`` and
``runs`` in conftest.py)."""

import os
import shutil

import jax
import ml_collections
import numpy as np

from configs import base


def config(num_steps, lr=1e-2):
  """``num_steps`` of a 2-layer classifier at 32 px, batch 16 over a
  (data, fsdp=2) mesh, EMA on, checkpoint every 3 steps, log every 2; the
  run's third and fourth steps traced with jax.profiler."""
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
  c.train.log_every = 2
  c.train.checkpoint_every = 3
  c.train.image_every = 0
  c.train.ema_decay = 0.9
  c.train.profile_steps = 2
  c.train.profile_skip_steps = 2
  c.optimizer.lr = lr
  return c


def leaves(state):
  return [np.asarray(x) for x in jax.tree_util.tree_leaves(state)]


def train(num_steps, workdir):
  """Trains ``config(num_steps)`` in ``workdir``; the final train state."""
  from genvis_jax.train import trainer as trainer_lib  # pylint: disable=import-outside-toplevel
  return trainer_lib.train_and_evaluate(config(num_steps), str(workdir))


def interrupt_step(monkeypatch, call: int) -> None:
  """The trainer's ``call``-th step (1-based) raises KeyboardInterrupt, as a
  notebook's second Ctrl-C (the first asks for a clean stop) does there."""
  from genvis_jax.train import trainer as trainer_lib  # pylint: disable=import-outside-toplevel
  step, calls = trainer_lib.Trainer.step, []

  def interrupted(self, state, batch):
    calls.append(len(calls) + 1)
    if calls[-1] == call:
      raise KeyboardInterrupt
    return step(self, state, batch)

  monkeypatch.setattr(trainer_lib.Trainer, "step", interrupted)


def copy_run(base, tmp_path):
  wd = str(tmp_path / "wd")
  shutil.copytree(base, wd)
  return wd


def truncate_data_files(step_dir, keep=0.5):
  """Cuts every OCDBT data file to ``keep`` of its size. (Cutting only the
  largest one was not always damage: the file layout varies from run to
  run, and a run whose largest file was not read on restore resumed from
  it. Half of each file can likewise spare every weight, the optimizer
  state taking the damage: a weight load needs ``keep=0``.)"""
  d = os.path.join(step_dir, "state", "ocdbt.process_0", "d")
  for f in (os.path.join(d, n) for n in os.listdir(d)):
    with open(f, "r+b") as fh:
      fh.truncate(int(os.path.getsize(f) * keep))

