"""Train state and its sharded initialisation."""

from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from genvis_jax.core import sharding as shd

PyTree = Any


@flax.struct.dataclass
class TrainState:
  """Everything a training run carries between steps (all jax arrays).

  params / opt_state are dicts of parameter groups (e.g. "model", "disc");
  ``ema`` mirrors ``params[task.ema_group]`` or is None.
  """
  step: jax.Array
  params: dict
  opt_state: dict
  ema: Any = None


def init_state(task, optimizers, rng) -> TrainState:
  """Pure initialiser (boxed params), used under eval_shape and jit."""
  boxed = task.init_params(rng)
  params = nn.unbox(boxed)
  opt_state = {g: optimizers[g].init(params[g]) for g in task.param_groups}
  ema = params[task.ema_group] if _use_ema(task) else None
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=opt_state, ema=ema)


def _use_ema(task) -> bool:
  return task.ema_group is not None and task.config.train.ema_decay > 0


def state_shardings(task, optimizers, mesh, rules, rng):
  """(abstract state, shardings) with parameters sharded by the logical rules.

  Optimizer-state leaves that mirror parameters (Adam moments) take the
  parameter's sharding; scalars (counts) are replicated.
  """
  boxed = jax.eval_shape(task.init_params, rng)
  param_sh = shd.tree_shardings(boxed, mesh, rules)
  abstract = jax.eval_shape(lambda r: init_state(task, optimizers, r), rng)

  def opt_sh(group):
    # optax states embed parameter-shaped subtrees; match them structurally.
    p_struct = jax.tree_util.tree_structure(abstract.params[group])
    return _map_param_like(abstract.opt_state[group], p_struct, param_sh[group],
                           mesh)

  shardings = TrainState(
      step=shd.replicated(mesh),
      params=param_sh,
      opt_state={g: opt_sh(g) for g in task.param_groups},
      ema=param_sh[task.ema_group] if abstract.ema is not None else None)
  return abstract, shardings


def _map_param_like(tree, p_struct, p_shardings, mesh):
  """Replaces param-shaped subtrees by the param shardings, rest replicated."""
  def is_param_like(x):
    try:
      return jax.tree_util.tree_structure(x) == p_struct
    except Exception:  # pylint: disable=broad-except
      return False
  def f(x):
    if is_param_like(x):
      return p_shardings
    return jax.tree_util.tree_map(lambda _: shd.replicated(mesh), x)
  return jax.tree_util.tree_map(f, tree, is_leaf=is_param_like)
