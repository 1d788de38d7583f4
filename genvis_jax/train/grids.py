"""The sample grids a training run draws: when (every ``image_every`` steps
and the last), from which batch (the run's first; kept in its workdir where
the grids show its images, so a resume shows the same ones), and the task's
images of it at a step."""

from __future__ import annotations

import os
import zipfile

import jax
import numpy as np
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from genvis_jax import errors
from genvis_jax.core import files
from genvis_jax.core import metrics as metrics_lib
from genvis_jax.core import multihost

# The grids' inputs, kept beside the grid PNGs (``workdir/images/``).
KEPT_BATCH = "visual_batch.npz"


def visual_batch(local: dict, workdir=None, size: int = 16) -> dict:
  """The first ``size`` examples of process 0's ``local`` batch (host arrays),
  the same on every process: the sample grids feed them to jitted code as
  replicated values, which must not differ between processes (each would
  otherwise pair its own originals with reconstructions computed from
  others'). With ``workdir``, the batch kept there (``KEPT_BATCH``) where it
  has this batch's keys, shapes and dtypes, else this one, kept: a resume's
  first batch is another, and a tokenizer's reconstructions would show
  other images from the resume on. A collective: every process calls it at
  the same step."""
  first = jax.tree_util.tree_map(lambda x: np.asarray(x)[:size], local)
  if workdir is not None:
    path = os.path.join(os.fspath(workdir), "images", KEPT_BATCH)
    kept = {}
    # Process 0 reads / writes it; a failure stops every process with its
    # message (not a bare collective error on the others).
    multihost.on_process_0(lambda: kept.update(_kept(first, path)))
    first = kept or first
  if jax.process_count() == 1:
    return first
  return jax.tree_util.tree_map(
      np.asarray, multihost_utils.broadcast_one_to_all(first))


def _layout(batch: dict) -> dict:
  """Each array's shape past the batch size, and dtype."""
  return {k: (tuple(v.shape[1:]), str(v.dtype))
          for k, v in sorted(batch.items())}


def _kept(first: dict, path: str) -> dict:
  """The batch kept at ``path``, its first ``len(first)`` examples, if it
  matches ``first``'s layout and has as many (a resume on more hosts may
  read fewer per host; every process's batch keeps ``first``'s size, which
  ``broadcast_one_to_all`` needs); else ``first``, written there (whole:
  ``files.write_whole``)."""
  try:
    if epath.Path(path).exists():
      with files.open_read(path) as f, np.load(f, allow_pickle=False) as z:
        kept = {k: z[k] for k in z.files}
      n = len(next(iter(first.values())))
      have = min(len(v) for v in kept.values())
      if _layout(kept) != _layout(first):
        logging.warning("%s holds other arrays than this run's batches (%s; "
                        "now %s): the grids show this run's first batch "
                        "from here on.", path, _layout(kept), _layout(first))
      elif have < n:
        logging.warning("%s holds %d examples, fewer than the %d this run "
                        "shows: the grids show this run's first batch from "
                        "here on.", path, have, n)
      else:
        return {k: v[:n] for k, v in kept.items()}
  except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
    logging.warning("%s could not be read (%s): the grids show this run's "
                    "first batch from here on.", path, errors.first_line(e))
  files.write_whole(path, lambda tmp: np.savez(tmp, **first))
  return first


def drawn(workdir, step: int) -> bool:
  """Whether ``workdir/images`` holds a grid of ``step`` (as process 0 sees
  it; a collective)."""
  folder = epath.Path(os.fspath(workdir)) / "images"
  return bool(multihost.decided_on_process_0(
      lambda: folder.exists() and any(folder.glob(f"*_{step:07d}.png"))))


def write_visuals(trainer, state, batch, writer, workdir, step) -> None:
  """Draws ``trainer.task``'s grids of ``batch`` (``visual_batch``) with the
  weights of ``state`` (its EMA in the task's ``ema_group`` where kept) and
  writes them at ``step`` (TensorBoard and PNGs under ``workdir``)."""
  task = trainer.task
  params = dict(state.params)
  if state.ema is not None:
    params[task.ema_group] = state.ema
  with trainer.context():
    images = task.visualize(params, trainer.frozen, batch,
                            jax.random.fold_in(trainer.visual_rng, step))
  if images:
    images = {k: np.asarray(jax.device_get(v)) for k, v in images.items()}
    metrics_lib.write_images(writer, workdir, step, images)


class Schedule:
  """A training loop's grids: every ``every`` steps and at the last
  (``every`` = 0: none). A stop skips its step's grid so the save comes
  first in a preemption's grace period; the resume draws it (``start``),
  and a stop on the last step draws it after the save (``finish``)."""

  def __init__(self, trainer, writer, workdir, every: int, num_steps: int):
    self.trainer, self.writer, self.workdir = trainer, writer, workdir
    self.every, self.num_steps = int(every), int(num_steps)
    self.batch = None
    self.missed = None   # the last step's grid, skipped by a stop

  def due(self, done: int) -> bool:
    return bool(self.every) and (done % self.every == 0
                                 or done == self.num_steps)

  def start(self, state, local: dict, step: int) -> None:
    """Takes the grids' batch at the loop's first step ``step`` (a
    collective) and draws the grid of a resume's ``step`` if missing."""
    if not self.every or self.batch is not None:
      return
    self.batch = visual_batch(
        local, self.workdir if self.trainer.task.grids_show_batch else None)
    if step and self.due(step) and not drawn(self.workdir, step):
      logging.info("Drawing the grids of step %d (the run stopped before "
                   "drawing them).", step)
      self.draw(state, step)

  def draw(self, state, step: int) -> None:
    write_visuals(self.trainer, state, self.batch, self.writer, self.workdir,
                  step)

  def skip(self, done: int) -> None:
    """A stop at ``done``: its grid is left to the resume (or ``finish``)."""
    if self.due(done):
      self.missed = done

  def finish(self, state) -> None:
    """At the loop's normal end: the last step's grid if a stop skipped it
    (the checkpoint already written: nothing resumes a finished run)."""
    if self.missed == self.num_steps:
      self.draw(state, self.num_steps)
