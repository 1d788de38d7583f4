"""The trainer's own pieces: the initial state built from one trace of the
initialiser, and the context its programs trace under."""

import flax.linen as nn
import jax
import numpy as np

from bench import plan_memory as pm
from genvis_jax.core import sharding as shd
from genvis_jax.train import state as state_lib
from genvis_jax.train import trainer as trainer_lib
from tests import small_run


def test_the_initialiser_is_traced_once(monkeypatch):
  """The state's shapes, its shardings and the state itself come from one
  trace of the model's init (seconds for a paper-size model); the state is
  the one jitting ``init_state`` (unboxed) builds, on the same shardings."""
  cfg = small_run.config(2)
  mesh, task = trainer_lib.setup(cfg)
  traces, init_params = [], task.init_params
  monkeypatch.setattr(task, "init_params",
                      lambda rng: traces.append(rng) or init_params(rng))
  tr = trainer_lib.Trainer(cfg, mesh=mesh, task=task)
  state = tr.init_state()
  assert len(traces) == 1
  with tr.context():
    again = jax.jit(lambda r: nn.unbox(state_lib.init_state(
        task, tr.optimizers, r)), out_shardings=tr.shardings)(tr.init_rng)
  leaves = jax.tree_util.tree_leaves_with_path
  assert jax.tree_util.tree_structure(state) == jax.tree_util.tree_structure(
      again)
  for (path, x), y in zip(leaves(state), jax.tree_util.tree_leaves(again)):
    assert x.sharding == y.sharding and np.array_equal(x, y), path
  # The abstract state (checkpoint restores read it) is that state's.
  shapes = lambda t: jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), t)
  assert shapes(tr.abstract) == shapes(state)


def test_a_trainer_traces_at_the_configs_matmul_precision():
  """``Trainer.context()`` (its step, grids and initialiser) applies
  ``config.matmul_precision`` as ``train_and_evaluate`` does, so a step
  stepped or planned from a notebook is the run's program (it compiled
  XLA's default, one bf16 pass per fp32 dot on a TPU)."""
  cfg = small_run.config(2)
  cfg.matmul_precision = "float32"
  tr = trainer_lib.Trainer(cfg)
  batch = pm.batch_spec(cfg, tr.task, 16, shd.batch_sharding(tr.mesh,
                                                             tr.rules))
  with tr.context():
    assert jax.config.jax_default_matmul_precision == "float32"
    hlo = tr._step.lower(  # pylint: disable=protected-access
        tr.abstract_state(), batch, tr.train_rng, tr.frozen).as_text()
  assert jax.config.jax_default_matmul_precision is None   # put back
  assert "precision = [HIGHEST, HIGHEST]" in hlo
  assert "DEFAULT" not in hlo
