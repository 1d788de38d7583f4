"""What ``optimizers.make_optimizer`` / ``make_schedule`` do to an update:
clipping, the weight-decay mask and Adam's moments, and RAR's cosine
schedule against its official formula (the masks and configs alone are
checked in the model tests)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import base
from configs import rar_b
from genvis_jax.train import optimizers as opt_lib


def _adamw(grad_clip):
  o = base.get_config().optimizer
  o.update(dict(lr=0.5, b1=0.9, b2=0.96, weight_decay=0.1))
  t = base.get_config().train
  t.grad_clip = grad_clip
  return opt_lib.make_optimizer(o, t)


def _adam_state(state):
  return next(s for s in jax.tree_util.tree_leaves(
      state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
              if isinstance(s, optax.ScaleByAdamState))


def test_adamw_decays_the_masked_params_clips_and_keeps_its_betas():
  """Zero gradients: decay alone moves the kernel (lr x wd x p) and no
  parameter ``no_decay`` names; a gradient of norm 20 is clipped to
  ``config.train.grad_clip`` before Adam's moments, whose rates are b1 and
  b2 (official AdamW with decoupled decay; RAR clips to 1.0)."""
  params = {"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)},
            "norm": {"scale": jnp.ones(2)}}
  tx = _adamw(grad_clip=1.0)
  state = tx.init(params)
  zero = jax.tree_util.tree_map(jnp.zeros_like, params)
  upd, _ = tx.update(zero, state, params)
  np.testing.assert_allclose(upd["dense"]["kernel"], -0.5 * 0.1, rtol=1e-6)
  assert not np.any(upd["dense"]["bias"]) and not np.any(upd["norm"]["scale"])
  grads = dict(zero, dense={"kernel": jnp.full((2, 2), 10.0),
                            "bias": jnp.zeros(2)})
  for clip, entry in ((1.0, 0.5), (0.0, 10.0)):   # 0: off
    adam = _adam_state(_adamw(clip).update(grads, state, params)[1])
    np.testing.assert_allclose(adam.mu["dense"]["kernel"], 0.1 * entry,
                               rtol=1e-6)
    np.testing.assert_allclose(adam.nu["dense"]["kernel"],
                               (1 - 0.96) * entry ** 2, rtol=1e-6)


def test_rars_cosine_schedule_is_the_official_formula():
  """RAR-B's schedule (configs/rar_b.py) step by step against 1d-tokenizer
  ``utils/lr_schedulers.py`` ``get_cosine_schedule_with_warmup``: linear
  warm-up from 0, then ``end + (base - end) * 0.5 (1 + cos(pi p))`` with p
  from 0 at the warm-up's end to 1 at the last step."""
  c = rar_b.get_config()
  o, steps = c.optimizer, c.train.num_steps
  assert (o.schedule, o.lr, o.warmup_steps, o.end_lr, steps) == (
      "cosine", 4e-4, 62_500, 1e-5, 250_000)

  def official(step):
    if step < o.warmup_steps:
      return o.lr * step / max(1, o.warmup_steps)
    progress = (step - o.warmup_steps) / max(1, steps - o.warmup_steps)
    ratio = max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
    return o.end_lr + (o.lr - o.end_lr) * ratio

  schedule = opt_lib.make_schedule(o, steps)
  for step in (0, 1, 31_250, 62_500, 100_000, 187_500, 249_999, 250_000):
    # (abs: optax's warm-up ramp in float32 cancels at its first steps)
    assert float(schedule(step)) == pytest.approx(official(step), rel=1e-5,
                                                  abs=1e-10), step
