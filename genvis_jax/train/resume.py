"""Resuming a run: the newest restorable step of its workdir and the input
position saved with it (or, where that position cannot be used, a data
order drawn afresh that later resumes keep), or a fresh state.
"""

from __future__ import annotations

import json

import flax.linen as nn
import jax
import numpy as np
from absl import logging
from etils import epath

from genvis_jax import errors
from genvis_jax.core import checkpoint_files as ckpt_files
from genvis_jax.core import checkpoint_fit as fit
from genvis_jax.core import multihost
from genvis_jax.core import settings as settings_lib
from genvis_jax.train import state as state_lib


def check_fresh_start(config, task, workdir) -> None:
  """Refuses a fresh run (no step saved in ``workdir``) whose start from
  ``config.init_from`` cannot be made: without it where the task needs the
  weights it continues (``task.needs_init_from``: an Equivariant tokenizer's
  stage 2, a run with ``init_groups``); with ``init_groups`` the task lacks;
  or with nothing loadable there, a run of another model, or weights of
  another size (``weights.check_source``). A resume reads its own step and
  passes. Called on every process before the data are opened or anything is
  built (minutes on a pod, past a launcher's check that the workers
  started).

  Raises:
    ConfigError: naming why and ``--config.init_from``, or the groups.
    CheckpointNotFoundError, CheckpointMismatchError: as
      ``weights.check_source``.
  """
  folder = epath.Path(workdir) / "checkpoints"
  if multihost.decided_on_process_0(
      lambda: folder.exists() and bool(ckpt_files.saved_steps(folder))):
    return
  if not config.init_from:
    needs = task.needs_init_from()
    if needs:
      raise errors.ConfigError(
          f"config.init_from is empty, but {needs}. Set --config.init_from="
          f"<the run to start from, or its checkpoints/<step>>.")
    return
  from genvis_jax.core import weights as weights_lib  # pylint: disable=import-outside-toplevel
  groups = state_lib.check_init_groups(config, task.param_groups)
  # The shapes the state will have (traced only: about a second at paper
  # size), so weights of another size are refused here too.
  shapes = nn.unbox(jax.eval_shape(task.init_params, jax.random.key(0)))
  weights_lib.check_source(config.init_from, "--config.init_from", groups,
                           model_name=config.model.name,
                           abstract_params=shapes, model_config=config.model)


def restore_or_init(config, workdir, trainer, ckpt, data_iter, info,
                    make_iterator):
  """The newest restorable step of ``workdir`` with its input position, or a
  fresh state (from ``config.init_from`` if set): ``(state, data_iter,
  info, data seed)``. ``make_iterator(seed)``: the training input of
  another data seed, ``(iterator, info)``."""
  task = trainer.task
  # A workdir of another model config is named first: the token check
  # below would otherwise blame the token files for it.
  multihost.on_process_0(lambda: _check_newest_config(ckpt, config))
  # Before restoring: a resume on other tokens is refused without reading state.
  from genvis_jax.data import run_origin  # pylint: disable=import-outside-toplevel
  encodes = task.encodes_with_tokenizer
  run_origin.check(config, workdir, ckpt.latest_step(), encodes)
  # The newest step that loads; damaged newer ones are moved aside.
  latest, state, saved_config = ckpt.restore_latest(
      trainer.abstract_state(), config, with_data=True)
  # Of the step restored, before the record below takes the files of now.
  tokens_changed = run_origin.files_changed(config, workdir, latest)
  # After the config check: a refused workdir (another run's) gets no record.
  run_origin.record(config, workdir, latest, encodes)
  if latest is None:
    state = trainer.init_state()
    if config.init_from:
      state = state_lib.from_weights(state, config,
                                     trainer.abstract_state().params,
                                     task.ema_group)
    return state, data_iter, info, config.seed
  logging.info("Resumed from %s step %d", ckpt.directory, latest)
  changed = saved_config and resumed_differences(
      saved_config, json.loads(config.to_json_best_effort()))
  if changed:
    logging.warning(
        "This run's config differs from the checkpoint's; it continues with "
        "this run's values:\n  %s", settings_lib.shorten(changed, 20, "\n  "))
  data_iter, info, data_seed = resume_input(
      ckpt, latest, saved_config, config, data_iter, info, make_iterator,
      trainer.data_group, tokens_changed)
  if config.init_from:
    logging.warning(
        "config.init_from=%s is not loaded: it initialises a fresh run, and "
        "this workdir resumes its own step %d. Use a new --workdir to start "
        "from those weights.", config.init_from, latest)
  return state, data_iter, info, data_seed


# The multislice layout (``config.mesh.dcn_shape``) of a run saved before the
# setting existed: every slice on ``data``, as it ran.
OLD_DCN_SHAPE = {"data": -1, "fsdp": 1, "tensor": 1}


def _with_dcn_shape(tree):
  """``tree`` (a config record) with ``OLD_DCN_SHAPE`` in each ``mesh``
  section that has none (a demo's stages have one each)."""
  if not isinstance(tree, dict):
    return tree
  out = {k: _with_dcn_shape(v) for k, v in tree.items()}
  mesh = out.get("mesh")
  if isinstance(mesh, dict) and "shape" in mesh and "dcn_shape" not in mesh:
    out["mesh"] = {**mesh, "dcn_shape": dict(OLD_DCN_SHAPE)}
  return out


def resumed_differences(saved: dict, now: dict) -> list[str]:
  """The settings a resume continues with other values of (one line each):
  all but ``config.model``'s, whose differences were refused already, except
  how it computes (``checkpoint_fit.COMPUTE_ONLY``: ``model.dtype``...)."""
  compute = lambda c: {k: settings_lib.get(c, k) for k in fit.COMPUTE_ONLY}
  names = ("checkpoint", "this run")
  # Model settings a record (or this config) leaves out, at their defaults:
  # a record written before the configs listed every one matches; so does
  # one written before config.mesh.dcn_shape.
  saved, now = fit.completed_config(saved), fit.completed_config(now)
  saved = _with_dcn_shape(saved)
  return sorted(
      settings_lib.differences(saved, now, ignore=("model",), names=names) +
      settings_lib.differences(compute(saved), compute(now), names=names))


# config.data settings that change what a saved input position means, with
# their value in a run saved before the setting existed (None: unknown).
ORDER_SETTINGS = (("num_workers", None), ("crops_per_epoch", "all"))


def order_setting_changed(saved_config: dict | None, config) -> str:
  """Why a position saved under ``saved_config`` cannot resume ``config``'s
  input ("" if it may): Grain accepts some states of another pipeline and
  then yields other batches, so the saved config decides (none saved: "")."""
  if saved_config is None:
    return ""
  for key, default in ORDER_SETTINGS:
    before = settings_lib.get(saved_config, f"data.{key}")
    before = default if before is None else before
    now = config.data.get(key, default)
    if before is not None and before != now:
      return (f"was saved with config.data.{key}={before!r} and this run has "
              f"{now!r}")
  return ""


def listing_changed(saved: dict, now: dict | None, step: int,
                    path: str) -> str:
  """Why an input position saved with ``step`` over the data listing
  ``saved`` cannot be used on the listing ``now`` (``PipelineInfo.listing``):
  "" if the same; the reason if an image folder's images or class folders
  were added, removed or renamed since without moving a label, or a TFDS
  split has another size or release (the saved position would repeat some
  of the epoch's images and skip others).

  Raises:
    ConfigError: a class kept its name but not its label (a class folder
      removed or added before it: a label is the class's place in the sorted
      list), so the run would go on training on other labels.
  """
  if now is None or saved == now:
    return ""
  if "tfds" in saved or "tfds" in now:
    return (f"counts examples of another TFDS data set ({saved.get('tfds')}, "
            f"{saved.get('count')} examples then; {now.get('tfds')}, "
            f"{now.get('count')} now: prepared again or another split)")
  before, after = list(saved.get("classes") or ()), list(now.get("classes") or ())
  added = sorted(set(after) - set(before))
  removed = sorted(set(before) - set(after))
  classes = (f"added: {', '.join(added) or 'none'}; removed: "
             f"{', '.join(removed) or 'none'}")
  moved = [f"{c!r} {before.index(c)} -> {after.index(c)}" for c in before
           if c in after and before.index(c) != after.index(c)]
  if moved:
    raise errors.ConfigError(
        f"The class folders of the image folder {path!r} changed since step "
        f"{step} was saved ({classes}). A class's label is its place in the "
        f"sorted class list, so {len(moved)} class(es) now have other labels "
        f"({settings_lib.shorten(moved, 3)}) and the run would go on training "
        "on them. Restore the folder's classes to resume, or start a new "
        "--workdir (--config.init_from=<this run> keeps the weights).")
  also = f"; class folders {classes}" if added or removed else ""
  return (f"counts examples of another listing of the image folder {path!r} "
          f"({saved.get('count')} images then, {now.get('count')} now: "
          f"images added, removed or renamed since{also})")


def _check_newest_config(ckpt, config) -> None:
  """Raises CheckpointMismatchError if the newest step was saved with another
  model config; a config it cannot read is left to the restore (damage)."""
  latest = ckpt.latest_step()
  if latest is None:
    return
  try:
    saved = ckpt_files.saved_config(ckpt.directory / str(latest))
  except Exception:  # pylint: disable=broad-except
    return
  fit.check_config_matches(saved, config)


def resume_input(ckpt, step: int, saved_config: dict | None, config,
                 data_iter, info, make_iterator, data_group=None,
                 unusable: str = ""):
  """Moves the input pipeline to the position saved with ``step`` (whose run
  config was ``saved_config``); returns ``(data_iter, info, data seed)``.
  ``make_iterator(seed)`` builds the input in another data order;
  ``data_group``: this process's ``(group, count)`` of the data
  (``sharding.data_groups``); ``unusable``: why the position cannot be used
  whatever it holds ("" if it may; e.g. token files written again since).

  The saved order's seed is the one recorded with the position (a run that
  once drew its order afresh keeps that order on later resumes). Where the
  position cannot be used on any process (another process count, data group
  or ``config.data.num_workers``, a state that does not fit this pipeline,
  ``unusable``), all
  processes draw the order afresh from :func:`resume_seed`, with a warning;
  the train state is resumed either way.

  Raises:
    Exception: this process cannot read its position or open its input in
      the saved order (storage, e.g. an OSError): no process changes the
      data order; the same command retries.
    multihost.OtherProcessError: another process cannot.
  """
  # Every collective below (and the one building an iterator holds on token
  # data) is reached by all processes or none: a process may not skip one
  # because of what it alone read.
  pos, error = None, None
  try:
    pos = ckpt.saved_position(step, data_group)
  except Exception as e:  # pylint: disable=broad-except
    error = e   # storage (OSError, or a file-system backend's own errors)
  why = pos.why if pos is not None else None
  if error is None and pos is not None and pos.listing is not None:
    # Also where the position is unusable anyway (another process count or
    # mesh): labels that moved stop the run; other files redraw the order.
    try:
      changed = listing_changed(pos.listing, info.listing(), step,
                                config.data.get("path", ""))
    except errors.ConfigError as e:
      error = e
    else:
      why = why or changed
  why = why or unusable or order_setting_changed(saved_config, config)
  unfit = multihost.gather_or_raise(
      int(bool(why)), error, "could not read their input position saved "
      f"with step {step} (their logs say why); run the same command again.")
  seed = config.seed
  if not unfit.any():
    saved_seed = int(config.seed if pos.seed is None else pos.seed)
    # Agreed first (a uint32 as two halves): building the iterator for the
    # saved seed holds a collective (token data).
    halves = [multihost.gather_ints(saved_seed >> 16),
              multihost.gather_ints(saved_seed & 0xFFFF)]
    if any((h != h[0]).any() for h in halves):   # one set of files: damaged
      why = "holds another data seed than on other processes"
    else:
      try:
        if saved_seed != seed:
          data_iter, info = replace_iterator(data_iter, make_iterator,
                                             saved_seed)
          seed = saved_seed
      except Exception as e:  # pylint: disable=broad-except
        error = e
      else:
        try:
          data_iter.set_state(pos.state)
        except Exception as e:  # pylint: disable=broad-except
          why = f"does not fit this input pipeline ({errors.first_line(e)})"
    unfit = multihost.gather_or_raise(
        int(bool(why)), error, "could not open their input pipeline in the "
        f"data order saved with step {step} (their logs say why); run the "
        "same command again.")
  if unfit.any():
    why = why or f"cannot be used on processes {np.flatnonzero(unfit).tolist()}"
    seed = resume_seed(config.seed, step)
    logging.warning(
        "The input position saved with step %d %s, so it cannot be restored. "
        "Training resumes from step %d with the data order drawn afresh (seed "
        "%d from config.seed and the step, kept in later checkpoints): "
        "examples of the epoch in progress may be seen once more or once less.",
        step, why, step, seed)
    data_iter, info = replace_iterator(data_iter, make_iterator, seed)
  return data_iter, info, seed


def close_iterator(data_iter) -> None:
  """Stops ``data_iter``'s prefetch threads and workers (Grain's ``close``).
  Left to the garbage collector, a dropped iterator's close ran inside the
  next pipeline's prefetch thread and could deadlock it (a second pipeline
  in one process: a resume that rebuilds its input, a notebook's stages)."""
  close = getattr(data_iter, "close", None)
  if close is not None:
    close()


def replace_iterator(old, make_iterator, seed: int):
  """``make_iterator(seed)`` after closing ``old`` (``close_iterator``)."""
  close_iterator(old)
  return make_iterator(seed)


def resume_seed(seed: int, step: int) -> int:
  """The data seed of a run resumed at ``step`` without its input position:
  a uint32 from (``seed``, ``step``), so a rerun draws the same order."""
  return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(step)])
             .generate_state(1)[0])
