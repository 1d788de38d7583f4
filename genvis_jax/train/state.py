"""Train state, its sharded initialisation and its start from other weights."""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.extend import core as jcore
import numpy as np
from absl import logging

from genvis_jax import errors
from genvis_jax.core import checkpoint_fit as fit
from genvis_jax.core import mesh_checks
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
  """The pure initialiser, traced by :func:`trace_init`: the initial state
  with its parameters still boxed (their logical axis names, which the
  shardings are read from); the optimizer states and EMA unboxed."""
  boxed = task.init_params(rng)
  params = nn.unbox(boxed)
  opt_state = {g: optimizers[g].init(params[g]) for g in task.param_groups}
  ema = params[task.ema_group] if _use_ema(task) else None
  return TrainState(step=jnp.zeros((), jnp.int32), params=boxed,
                    opt_state=opt_state, ema=ema)


def check_init_groups(config, param_groups) -> tuple[str, ...]:
  """``config.init_groups``, each one of the task's ``param_groups`` but the
  model's (which init_from loads anyway).

  Raises:
    ConfigError: naming the groups that are not.
  """
  groups = tuple(config.get("init_groups", ()))
  others = sorted(set(param_groups) - {"model"})
  wrong = [g for g in groups if g not in others]
  if wrong:
    raise errors.ConfigError(
        f"config.init_groups={groups} names {wrong}: init_from loads the "
        f"model's weights, and this task's other parameter groups are "
        f"{others or 'none'}.")
  return groups


def from_weights(state: TrainState, config, abstract_params: dict,
                 ema_group: str | None) -> TrainState:
  """A fresh run's ``state`` with the weights of ``config.init_from``: the
  model's (a run's EMA where it kept one; also the start of this run's
  EMA), then each parameter group ``config.init_groups`` names from the
  same step of that run (the Equivariant tokenizer's stage 2 goes on with
  stage 1's discriminator, "disc", as the official ``ckpt_path`` loads the
  whole state dict). Optimizer states start afresh. ``abstract_params``:
  the state's params as ``jax.ShapeDtypeStruct`` with shardings, per group.

  Raises:
    ConfigError: ``config.init_groups`` names a group this task does not
      have, or the model's.
    CheckpointNotFoundError: a group is asked of a parameter checkpoint
      (it holds a model's weights only).
    CheckpointMismatchError, CheckpointRestoreError: as
      ``weights.restore_params``.
  """
  # Local: the step (train/step.py) imports this module without Orbax.
  from genvis_jax.core import weights as weights_lib  # pylint: disable=import-outside-toplevel
  groups = check_init_groups(config, abstract_params)
  # The step process 0 pins: every process, and every group, reads it.
  pinned = weights_lib.resolve_all([config.init_from])[0]
  params = dict(state.params)
  params["model"] = weights_lib.restore_params(
      pinned, abstract_params["model"], setting="--config.init_from",
      model_config=config.model)
  for group in groups:
    params[group] = weights_lib.restore_params(
        pinned, abstract_params[group], group=group,
        setting=f"--config.init_from with config.init_groups {group!r}")
  state = state.replace(params=params)
  if state.ema is not None and ema_group == "model":
    # A copy: the step donates the state, and one buffer in two leaves would
    # be donated twice (XLA refuses it, and the process crashed).
    state = state.replace(ema=_fresh_buffers(params["model"]))
  logging.info("Initialised %s from %s", ["model", *groups], pinned)
  return state


@jax.jit
def _fresh_buffers(tree):
  """A copy of ``tree`` in new buffers with the same shardings, on one or
  many processes: one program for the tree, where ``x.copy()`` per leaf
  compiled one per distinct shape (36 for the Equivariant tokenizer)."""
  return jax.tree_util.tree_map(jnp.copy, tree)


def _use_ema(task) -> bool:
  return task.ema_group is not None and task.config.train.ema_decay > 0


class Initialiser(NamedTuple):
  """A run's initial state, traced once (:func:`trace_init`)."""
  abstract: TrainState    # jax.ShapeDtypeStruct leaves
  shardings: TrainState   # a jax.sharding.NamedSharding per leaf
  init: Callable          # rng -> TrainState on ``shardings`` (jitted)


def trace_init(task, optimizers, mesh, rules, rng) -> Initialiser:
  """The state's shapes, its shardings and the program that builds it, from
  one trace of the initialiser. A Flax init is slow to trace: tracing it for
  the boxed shapes, the state's shapes and the program took 5 s of RAR-XL's
  start-up on a CPU host, against 2 s now.

  Parameters are sharded by their logical axis names under ``rules``;
  optimizer-state leaves that mirror parameters (Adam moments) take the
  parameter's sharding; scalars (counts) are replicated. ``init`` jits the
  traced program (its jaxpr, which is not traced again) with those output
  shardings: the values and shardings of jitting :func:`init_state`
  unboxed. Trace under ``Trainer.context()`` (the run's mesh, rules and
  matmul precision), where the modules' logical constraints resolve.

  Raises:
    ConfigError: as ``mesh_checks.check_axes_split`` (a mesh axis that
      splits neither the batch nor enough of the parameters).
  """
  traced = jax.jit(functools.partial(init_state, task, optimizers)).trace(rng)
  boxed_state = traced.out_info
  boxed = boxed_state.params
  mesh_checks.check_axes_split(boxed, mesh, rules)
  param_sh = shd.tree_shardings(boxed, mesh, rules)
  note = mesh_checks.unsplit_note(boxed, mesh, rules)
  if note:
    logging.warning("%s", note)
  # Not nn.unbox: a box's unbox() adds a sharding constraint, a traced op.
  abstract = jax.tree_util.tree_map(
      lambda x: x.value if isinstance(x, nn.meta.AxisMetadata) else x,
      boxed_state, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))

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
  # A box holds one leaf: the boxed and unboxed states flatten alike.
  program = jcore.jaxpr_as_fun(traced.jaxpr)
  treedef = jax.tree_util.tree_structure(abstract)
  init = jax.jit(lambda r: jax.tree_util.tree_unflatten(treedef, program(r)),
                 out_shardings=shardings)
  return Initialiser(abstract, shardings, init)


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


def frozen_shardings(frozen, axes, mesh, rules):
  """Shardings of ``frozen`` (``Task.frozen_params``): the leaves ``axes``
  names (``Task.frozen_axes``, matched by path: ``checkpoint_fit.key_path``;
  each leaf's names fitted to its own shape) split by the logical rules as
  parameters are, the others (other groups, keys a weights file holds
  beyond the module's) replicated."""
  names = {}
  for group, tree in axes.items():
    for path, box in jax.tree_util.tree_leaves_with_path(
        tree, is_leaf=lambda b: isinstance(b, nn.LogicallyPartitioned)):
      if isinstance(box, nn.LogicallyPartitioned):
        names[group, fit.key_path(path)] = box.names
  return {group: jax.tree_util.tree_map_with_path(
      lambda path, x, g=group: shd.logical_sharding(
          names.get((g, fit.key_path(path))), np.shape(x), mesh, rules), tree)
          for group, tree in frozen.items()}
