"""A training run's weights: one step's EMA (or model) parameters out of
``<run>/checkpoints/<step>/state``, for ``core.weights``.

Only the weights are read, each host its shards of them, onto the loading
model's shardings (the run may have used another topology). Process 0 lists
the steps; each step is checked, then read, on every process with the
outcome agreed (``step_walk.first_readable``), so all processes load the
same step or all stop. No Orbax ``CheckpointManager`` is built: loading
only reads, and a manager waits for every process (twice) when it is built.
"""

from __future__ import annotations

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from genvis_jax.core import checkpoint as ckpt_lib
from genvis_jax.core import checkpoint_files as ckpt_files
from genvis_jax.core import checkpoint_fit as fit
from genvis_jax.core import multihost
from genvis_jax.core import pytree_io
from genvis_jax.core import step_walk


def load(run: epath.Path, abstract_params, where: str = "",
         model_name: str = "", step: int | None = None,
         group: str | None = None, model_config=None):
  """A training run's newest loadable step (or ``step``), as arrays on
  ``abstract_params``' shardings (the run may have used another topology):
  its EMA parameters (the model's where it keeps no EMA), or with ``group``
  that parameter group's (e.g. ``"disc"``, a GAN's discriminator).
  Every process must call it. ``model_config`` (the configured
  ``config.model``) names, when the weights do not fit, the model settings
  the run was trained with that differ.

  Raises:
    CheckpointNotFoundError: the run has no such step, or none.
    CheckpointMismatchError: the run is of another model, or its weights do
      not fit ``abstract_params``.
    CheckpointRestoreError: no step (or not ``step``) can be read; each
      step's reason is listed.
    step_walk.CheckpointStorageError: reading a step failed in the storage
      (unavailable, denied), not in its files: nothing is skipped.
    multihost.OtherProcessError: another process failed.
  """
  folder = run / "checkpoints"
  saved = saved_steps(run, where, step)
  # Every process loads the same step or all stop (one that failed alone
  # would leave the others waiting in their next collective); checked on
  # all before any reads the weights.
  walk = step_walk.first_readable(
      [step] if step is not None else saved,
      (lambda s, _: _check_step(folder, s, where, model_name),
       lambda s, _: _read_step(folder, s, abstract_params, where, group,
                               model_config)),
      folder, log_skipped=step is None)
  failed = walk.failed
  if walk.step is not None:
    params, kind = walk.value
    logging.info("Loaded the %s of step %d of %s%s.", kind, walk.step, run,
                 where)
    if failed:
      logging.warning("Loaded step %d of %s; newer steps %s are damaged.",
                      walk.step, run, [f for f, _ in failed])
    return params
  if step is not None:
    raise ckpt_lib.CheckpointRestoreError(
        f"Checkpoint step {step} under {folder}{where} cannot be read "
        f"({failed[0][1]}). Name another step, or the run's workdir {run} for "
        "its newest readable one.")
  raise ckpt_lib.CheckpointRestoreError(
      f"No checkpoint step under {folder}{where} can be read; "
      "tried:\n  " + "\n  ".join(f"step {s}: {r}" for s, r in failed))


def saved_steps(run: epath.Path, where: str = "",
                step: int | None = None) -> list[int]:
  """Process 0's listing of ``run``'s finalized steps, newest first, on every
  process. Every process must call it.

  Raises:
    CheckpointNotFoundError: the run has saved none, or not ``step``.
  """
  folder = run / "checkpoints"
  saved = multihost.ints_on_process_0(lambda: candidate_steps(run))
  if step is not None and step not in saved:
    raise ckpt_lib.CheckpointNotFoundError(
        f"No checkpoint step {step} under {folder}{where}; saved "
        f"steps: {sorted(saved) or 'none'}. Name one of them, or the run's "
        f"workdir {run} for its newest.")
  if not saved:
    raise ckpt_lib.CheckpointNotFoundError(
        f"No checkpoint under {folder}{where}: the run has not "
        "saved one yet.")
  return saved


def candidate_steps(run: epath.Path) -> list[int]:
  """Every saved step of ``run``, newest first. A step Orbax has not
  finalized (still being written, e.g. straight into its folder on GCS) is
  not saved yet."""
  folder = run / "checkpoints"
  if not folder.exists():
    return []
  return sorted(ckpt_files.saved_steps(folder), reverse=True)


def _check_step(folder: epath.Path, step: int, where: str,
                model_name: str) -> None:
  """Raises unless step ``step``'s files are whole (those of its weights,
  as ``core.weights.resolve`` checks them when it pins a step) and it is a
  run of ``model_name`` (any, if empty)."""
  # Each process reads its share of the arrays; the walk agrees.
  ckpt_files.validate_step(folder / str(step), with_data=False,
                           share=multihost.share(), weights_only=True)
  other_model = other_model_message(folder, step, where, model_name)
  if other_model:
    raise fit.CheckpointMismatchError(other_model)


def other_model_message(folder: epath.Path, step: int, where: str,
                        model_name: str) -> str:
  """Why step ``step`` under ``folder`` is not of model ``model_name`` (its
  saved config names another), or "" (it is, it names none, or any is
  expected)."""
  saved = ckpt_files.saved_config(folder / str(step))
  saved_name = ((saved or {}).get("model") or {}).get("name")
  if model_name and saved_name and saved_name != model_name:
    return (f"{folder.parent}{where} is a training run of model "
            f"{saved_name!r}; a checkpoint of model {model_name!r} is expected "
            "here. Point the setting at a run or converted checkpoint of "
            f"model {model_name!r}.")
  return ""


def fitting_tree(folder: epath.Path, step: int, abstract_params, where: str,
                 group: str | None = None, model_config=None):
  """The metadata tree of the weights a load of step ``step`` reads (its
  EMA parameters, else the model's, or ``group``'s), the path to it in the
  saved state, and which: ``(tree, path, kind)``. Reads no array.

  Raises:
    CheckpointMismatchError: the step has no ``group``, or the weights do
      not fit ``abstract_params`` (naming how the run's ``config.model``
      differs from ``model_config``).
  """
  meta = pytree_io.state_metadata(folder / str(step))
  # Only the weights asked for: the optimizer moments, discriminator and
  # other half of (params, EMA) would triple or quadruple the bytes read
  # (RAR-XL fp32: 11.5 GB for its 3.8 GB of weights).
  if group is not None:
    groups = sorted(meta["params"])
    if group not in groups:
      raise fit.CheckpointMismatchError(
          f"Step {step} of {folder.parent} has no {group!r} parameters "
          f"(its groups: {groups}): it is a run of another task.")
    path, kind = ("params", group), f"{group!r} parameters"
  elif meta.get("ema"):
    path, kind = ("ema",), "EMA parameters"
  else:
    path, kind = ("params", "model"), "model parameters"
  found = meta
  for key in path:
    found = found[key]
  try:
    fit.compare_trees(abstract_params, found,
                      f"Checkpoint {folder.parent} step {step}{where}",
                      fit.weights_fix(where))
  except fit.CheckpointMismatchError as e:
    if group is not None or model_config is None:
      raise
    raise fit.CheckpointMismatchError(str(e) + fit.model_settings_note(
        ckpt_files.saved_config(folder / str(step)), model_config)) from None
  return found, path, kind


def _read_step(folder: epath.Path, step: int, abstract_params, where: str,
               group: str | None = None, model_config=None):
  """Step ``step``'s EMA or model parameters (or ``group``'s), read onto
  ``abstract_params``' shardings (host arrays where they name none), and
  which. Raises CheckpointMismatchError, before reading, if they do not fit
  (``fitting_tree``)."""
  found, path, kind = fitting_tree(folder, step, abstract_params, where,
                                   group, model_config)
  # Each leaf straight onto its sharding: a host reads only its shards
  # (reading whole arrays on every host of a pod multiplies the bytes read
  # by the host count).
  args = jax.tree_util.tree_unflatten(
      jax.tree_util.tree_structure(found),
      jax.tree_util.tree_leaves(pytree_io.placed_restore_args(abstract_params)))
  want, restore_args = found, args
  for key in reversed(path):
    want, restore_args = {key: want}, {key: restore_args}
  # Through the handler: Orbax's CheckpointManager.restore ends in a wait
  # for every process, which one whose read failed would skip (see
  # step_walk.first_readable).
  state = pytree_io.restore_item(folder / str(step) / "state",
                                ocp.args.PyTreeRestore(
                                    item=want, restore_args=restore_args,
                                    partial_restore=True))
  for key in path:
    state = state[key]
  return state, kind
