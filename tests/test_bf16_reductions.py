"""Under bf16 compute every sum over the batch runs in float32: the traced
train steps of the paper models (runlocal size, ``model.dtype=bfloat16``)
hold no bf16 ``reduce_sum`` over more than a few elements.

A bias added in bf16 had its gradient summed over every row of the batch in
bf16 (Flax's ``Dense`` / ``Conv``): XLA:CPU gave a decoder's output-bias
gradient 2.6x-9x too small at 65k rows. ``layers.add_bias`` adds in float32;
this test finds a new place that does not."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from genvis_jax.core import sharding as shd
from genvis_jax.models import layers
from genvis_jax.train import tasks as tasks_lib
from genvis_jax.train import trainer as trainer_lib
from tests.test_plan_memory import pm   # bench/plan_memory.py, loaded once

# A sum over this many elements or fewer (a 2x2 unpool's backward, the
# flow head's 4 noise draws per token) loses nothing in bf16.
SMALL = 4


def _bf16_sums(jaxpr, found):
  for eqn in jaxpr.eqns:
    for param in eqn.params.values():
      for sub in param if isinstance(param, (list, tuple)) else [param]:
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          _bf16_sums(inner, found)
    if eqn.primitive.name == "reduce_sum":
      aval = eqn.invars[0].aval
      n = int(np.prod([aval.shape[a] for a in eqn.params["axes"]]))
      if aval.dtype == jnp.bfloat16 and n > SMALL:
        found.append(f"{aval.str_short()} over {eqn.params['axes']}: "
                     f"{eqn.source_info.traceback}")
  return found


@pytest.mark.parametrize("spec", [
    "configs/fqgan_dual_ds16.py:runlocal",   # ViT adapters, LlamaGen CNN, PatchGAN
    "configs/eq_tokenizer.py:runlocal",      # 1-D convs, GroupNorm guard, DINO disc
    "configs/eq_s.py:runlocal",              # windowed generator, flow head
    "configs/rar_b.py:runlocal",             # adaLN blocks, position tables
    "configs/far_b.py:dual,runlocal",        # factorized head
])
def test_the_bf16_train_step_sums_the_batch_in_float32(spec):
  config = pm.apply_overrides(pm.load_config(spec), mesh={"data": 1},
                              batch=4, micro_batches=1, remat=None,
                              dtype="bfloat16")
  task = tasks_lib.get_task(config)
  frozen = pm.frozen_lib.frozen_shapes(config, task)   # teachers by their shapes too
  mesh, task = trainer_lib.setup(config, mesh=shd.create_mesh(
      config.mesh, jax.devices()[:1]), task=task)
  tr = trainer_lib.Trainer(config, mesh=mesh, task=task)
  batch = pm.batch_spec(config, tr.task, 4, shd.batch_sharding(mesh, tr.rules))
  abstract = lambda tree: jax.tree_util.tree_map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)
  with tr.context():
    closed = jax.make_jaxpr(tr._step)(  # pylint: disable=protected-access
        abstract(tr.abstract), abstract(batch),
        jax.ShapeDtypeStruct(tr.train_rng.shape, tr.train_rng.dtype),
        abstract(tr.frozen if frozen is None else frozen))
  found = _bf16_sums(closed.jaxpr, [])
  assert not found, "\n".join(found)


def test_add_bias_sums_its_gradient_in_float32():
  """The rule itself: a bias added in bf16 to 65k rows got its gradient
  summed in bf16; ``add_bias`` matches the float32 sum of the same
  cotangent."""
  rows = jax.random.normal(jax.random.key(0), (256, 256, 3), jnp.bfloat16)
  ct = jax.random.uniform(jax.random.key(1), rows.shape, jnp.bfloat16)
  bias = jnp.zeros((3,), jnp.float32)
  _, vjp = jax.vjp(lambda b: layers.add_bias(rows, b), bias)
  np.testing.assert_allclose(vjp(ct)[0], ct.astype(jnp.float32).sum((0, 1)),
                             rtol=1e-6)
  assert layers.add_bias(rows, bias).dtype == jnp.bfloat16
