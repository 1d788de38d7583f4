"""The sample grids a training run draws: a fixed batch the same on every
process, and the task's images of it written at a step."""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils

from genvis_jax.core import metrics as metrics_lib


def visual_batch(local: dict, size: int = 16) -> dict:
  """The first ``size`` examples of process 0's ``local`` batch (host arrays),
  the same on every process: the sample grids feed them to jitted code as
  replicated values, which must not differ between processes (each would
  otherwise pair its own originals with reconstructions computed from
  others'). A collective: every process calls it at the same step."""
  first = jax.tree_util.tree_map(lambda x: np.asarray(x)[:size], local)
  if jax.process_count() == 1:
    return first
  return jax.tree_util.tree_map(
      np.asarray, multihost_utils.broadcast_one_to_all(first))


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
