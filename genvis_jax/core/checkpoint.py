"""Orbax checkpoints: train state + Grain iterator state + config, async, last N.

Layout of ``workdir/checkpoints/<step>/``: ``state`` (TrainState: params,
optimizer state, EMA, step), ``data`` (per-process Grain iterator state and
the data seed of its order),
``config`` (the run's config as JSON, checked on restore).

Reliability: :meth:`Checkpointer.restore_latest` validates a step's files
(``core.checkpoint_files``) before reading them and falls back to the newest step that loads, moving
damaged ones aside to ``checkpoints/corrupt-<step>``; a failed (async) save
raises :class:`CheckpointSaveError` at the next :meth:`Checkpointer.check`
and leaves no ``.orbax-checkpoint-tmp`` folder behind; one a kill left (a
save cut short) is removed by the next run before its first save. On a
multi-host job process 0 lists the steps for every process, and a step any
process cannot read is skipped by all.

Loading parameters alone (``--config.init_from``, a tokenizer, converted
weights) is ``core.weights``; whether a checkpoint fits the config (tree,
model settings) is ``core.checkpoint_fit``.
"""

from __future__ import annotations

import errno
import json
import math
import time
from typing import Any, NamedTuple

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from genvis_jax import errors
from genvis_jax.core import checkpoint_files as ckpt_files
from genvis_jax.core import checkpoint_fit as fit
from genvis_jax.core import multihost
from genvis_jax.core import preemption
from genvis_jax.core import pytree_io
from genvis_jax.core.checkpoint_fit import CheckpointMismatchError  # re-exported
from genvis_jax.core.step_walk import first_readable
from genvis_jax.errors import UserError


def _remove_tree(path: epath.Path, settle_s: float = 0.2,
                 attempts: int = 50) -> None:
  """Removes a half-written step folder, outlasting writers that are still
  finishing in it (a save that fails in its synchronous part may have started
  the background writes of its other items): retries until the folder is gone
  and stays gone for ``settle_s``. Raises ``OSError`` where it cannot (at
  once for a read-only or forbidden folder)."""
  for _ in range(attempts):
    try:
      path.rmtree(missing_ok=True)
    except OSError as e:  # a writer added a file while it was being removed
      if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        raise
    time.sleep(settle_s)
    if not path.exists():
      return
  raise OSError(f"{path} is still being written to")


class CheckpointNotFoundError(UserError, FileNotFoundError):
  """No checkpoint where the config points."""


class CheckpointRestoreError(UserError, RuntimeError):
  """No checkpoint step of a workdir can be restored (all damaged)."""


class CheckpointSaveError(UserError, OSError):
  """Writing a checkpoint failed (e.g. no space left); training stops."""


class Restored(NamedTuple):
  """:meth:`Checkpointer.restore_latest`'s result: the ``step`` restored, its
  train ``state`` and the run ``config`` saved with it (a dict; None where
  the step has none or no config was given to compare with)."""
  step: int | None
  state: Any
  saved_config: dict | None


def unfinished_saves(directory) -> list[str]:
  """Names of the saves a stopped run left under ``directory`` (which Orbax
  removes when a manager is built with ``cleanup_tmp_directories``): its
  temporary folders and, on ``gs://`` where it writes a step's own folder
  and marks the end with a commit file, the step folders without it. A
  listing that fails gives [] (this only informs)."""
  try:
    if not directory.exists():
      return []
    names = [p.name for p in directory.glob("*.orbax-checkpoint-tmp*")]
    names += [p.name for p in directory.iterdir() if p.name.isdigit()
              and not ocp.step.is_path_finalized(p)]
    return sorted(names)
  except OSError as e:
    logging.warning("Could not list %s for unfinished saves: %s", directory, e)
    return []


def resume_note(directory, pending: int | None = None) -> str:
  """What running a training command again resumes from, by the finalized
  steps under ``directory`` (a run's ``checkpoints/``) now: a save in
  flight (``pending``, its step) is not one yet, and is named as what the
  run resumes from should it complete."""
  directory = epath.Path(directory)
  saved = ckpt_files.saved_steps(directory) if directory.exists() else set()
  note = (f"training resumes from step {max(saved)}, its last saved "
          "checkpoint" if saved else
          "no checkpoint is saved yet: training starts again from step 0")
  if pending is not None and pending > max(saved, default=0):
    note += (f" (from step {pending} if its save, still being written, "
             "completes)")
  return note


class Checkpointer:
  """Thin wrapper over ``ocp.CheckpointManager`` for training runs. Every
  process of a job builds it together: its steps are process 0's listing."""

  def __init__(self, workdir: str, *, keep: int = 3, async_save: bool = True,
               every: int | None = None):
    """``keep``: the newest steps kept; with ``every`` (the run's
    ``checkpoint_every``), the newest ``keep`` multiples of it plus the
    newest step: a stop's save (SIGTERM, a preemption) then replaces none of
    them, where a few stops within one interval left only steps a few
    apart (a run's step 1,500,000 deleted by two stops after it)."""
    self.directory = epath.Path(workdir) / "checkpoints"
    self._keep, self._async_save, self._every = keep, async_save, every
    self.manager = self._new_manager()
    self._pending = None  # step of a save whose outcome is not checked yet

  def in_flight(self) -> int | None:
    """The step of the save whose outcome is not checked yet (its write may
    still run), or None."""
    return self._pending

  def resume_note(self) -> str:
    """:func:`resume_note` of this run's checkpoints and save in flight;
    not the save where a stop ends the process at once (the command line's
    second Ctrl-C), which ends the save with it."""
    pending = None if preemption.exit_on_second_interrupt else self._pending
    return resume_note(self.directory, pending)

  def _new_manager(self) -> ocp.CheckpointManager:
    # grain lazily: sampling / evaluation / benchmarks import this module on
    # machines without grain.
    import grain  # pylint: disable=import-outside-toplevel
    if jax.process_index() == 0:
      leftovers = unfinished_saves(self.directory)
      if leftovers:   # a run that starts over from an older step says why
        logging.warning("Removing the leftovers of unfinished saves (a run "
                        "stopped while writing them): %s under %s.",
                        ", ".join(leftovers), self.directory)
    manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            **self._retention(), create=True,
            enable_async_checkpointing=self._async_save,
            # A save cut short by a kill (-9, a reclaimed VM) leaves a whole
            # state in <step>.orbax-checkpoint-tmp*; the next run removes it.
            cleanup_tmp_directories=True,
            step_name_format=ckpt_files.StepsOfProcess0(),
            # Not lightweight_initialize: the steps it lists get a naive
            # datetime.min, and a save at a preemption sync point then
            # fails on process 0 (Orbax subtracts the UTC commit times).
        ),
        item_handlers={
            "state": pytree_io.state_handler(),
            "data": grain.checkpoint.CheckpointHandler(),
            "config": ocp.JsonCheckpointHandler(),
        })
    # Orbax removes the leftovers in a background thread and waits for it
    # only in its first save; a run that stops before (an error) would close
    # the manager under it. Wait now: one listing of the folder.
    wait = getattr(manager, "_maybe_await_cleanup_tmp_directory", None)
    try:
      if wait is not None:
        wait()
    except Exception as e:  # pylint: disable=broad-except
      logging.warning("Could not remove the leftovers of an unfinished save "
                      "under %s (%s); they take space but do not stop the run.",
                      self.directory, e)
    return manager

  def _retention(self) -> dict:
    if not self._every:
      return {"max_to_keep": self._keep}
    policies = ocp.checkpoint_managers
    return {"preservation_policy": policies.AnyPreservationPolicy([
        policies.LatestN(n=1),
        policies.EveryNSteps(interval_steps=int(self._every),
                             max_to_keep=self._keep)])}

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, data_iter=None, config=None, force=False,
           data_seed=None, data_group=None, data_listing=None):
    """Starts an (async) save of ``step``; raises :class:`CheckpointSaveError`
    for this save's synchronous part or an earlier save that failed.
    ``data_seed``: the seed ``data_iter``'s order was drawn with,
    ``data_group``: this process's ``(group, count)`` of the data, and
    ``data_listing``: the data's listing (``PipelineInfo.listing``: an
    image folder's files and classes, a TFDS split's size and release), kept
    beside its position
    (see :meth:`saved_position`)."""
    # Orbax waits for the previous save anyway; a failed one stops here
    # (on every process: all save at the same steps).
    self.check(block=True, at_step=step, agree=True)
    items = {"state": ocp.args.PyTreeSave(state)}
    if data_iter is not None:
      import grain  # pylint: disable=import-outside-toplevel
      items["data"] = grain.checkpoint.CheckpointSave(
          ckpt_files.IteratorSnapshot(data_iter, data_seed, data_group,
                                     data_listing))
    if config is not None:
      items["config"] = ocp.args.JsonSave(json.loads(config.to_json_best_effort()))
    try:
      saved = self.manager.save(step, args=ocp.args.Composite(**items),
                                force=force)
    except Exception as e:  # pylint: disable=broad-except
      raise self._save_failed(step, e) from e
    if saved:
      self._pending = step
    return saved

  def check(self, block: bool = False, at_step: int | None = None,
            agree: bool = False) -> None:
    """Raises :class:`CheckpointSaveError` if the last started save failed.

    Non-blocking by default (cheap enough for every training step): a save
    still writing in the background is checked on a later call. ``at_step``
    (the training step just run) goes into the message.

    ``agree`` (several processes; every process calls it at the same step):
    the save counts as ended only once it has on every process, and a
    failure on any stops all at this step (``multihost.OtherProcessError``
    on the others) instead of one process leaving while the rest wait for
    it in the next step's collectives.
    """
    if not agree or jax.process_count() == 1:
      self._check_local(block, at_step)
      return
    ended = block or self._pending is None or (
        not self.manager.is_saving_in_progress())
    if not multihost.gather_ints(int(ended)).all():
      return   # still writing somewhere: checked at a later call
    step, error = self._pending, None
    try:
      self._check_local(True, at_step)
    except CheckpointSaveError as e:
      error = e
    multihost.gather_or_raise(
        0, error, f"could not save checkpoint step {step} (their logs say "
        f"why); training stopped at step {at_step or step}.")

  def _check_local(self, block: bool, at_step: int | None) -> None:
    if self._pending is None:
      return
    if not block and self.manager.is_saving_in_progress():
      return
    step = self._pending
    try:
      self.manager.wait_until_finished()  # re-raises the background error
    except Exception as e:  # pylint: disable=broad-except
      self._pending = None
      raise self._save_failed(step, e, at_step) from e
    # Only now: a Ctrl-C that ends the wait (a notebook's, while a stop's
    # save is written) leaves the save in flight, waited for on the way out.
    self._pending = None
    if not (self.directory / str(step)).exists():
      raise self._save_failed(step, RuntimeError(
          "the checkpoint was not finalized (Orbax logged why above)"), at_step)

  def _save_failed(self, step: int, error: BaseException,
                   at_step: int | None = None) -> CheckpointSaveError:
    """Removes the half-written step and builds the one error message."""
    if jax.process_index() == 0:
      for tmp in self.directory.glob(f"{step}.orbax-checkpoint-tmp*"):
        try:
          _remove_tree(tmp)
        except OSError as e:   # e.g. the folder became read-only: the cause
          logging.warning(     # below; a run's start removes leftovers
              "Could not remove the half-written checkpoint %s (%s); the "
              "next run in this workdir removes it.", tmp, e)
    previous = [s for s in self.manager.all_steps() if s < step]
    kept = (f"the newest complete checkpoint is step {max(previous)}, which a "
            "restart resumes from" if previous else "no earlier checkpoint exists")
    return CheckpointSaveError(
        f"Saving checkpoint step {step} under {self.directory} failed: "
        f"{save_error_cause(error)}. Training stopped at step "
        f"{step if at_step is None else at_step}; {kept}. Free space "
        "there (or lower config.train.keep_checkpoints), or use another "
        "--workdir.")

  def restore(self, step: int, abstract_state):
    """Restores the train state into ``abstract_state`` (ShapeDtypeStructs
    with shardings; Orbax reshards onto them, whatever mesh and process
    count wrote the step)."""
    metadata = pytree_io.state_metadata(self.directory / str(step))
    fit.compare_trees(abstract_state, metadata,
                      f"Checkpoint {self.directory / str(step)}")
    _note_other_mesh(step, pytree_io.saved_mesh(metadata), abstract_state)
    # Through the handler: the manager's restore ends in a wait for every
    # process, which one whose read failed would skip (see first_readable).
    return pytree_io.restore_item(self.directory / str(step) / "state",
                                  pytree_io.onto(abstract_state))

  def saved_position(self, step: int, data_group: tuple[int, int] | None = None
                     ) -> ckpt_files.SavedPosition:
    """This process's input position saved with ``step``
    (``checkpoint_files.saved_position``: the reasons it may not fit, the
    errors raised)."""
    return ckpt_files.saved_position(self.directory / str(step),
                                     jax.process_index(), jax.process_count(),
                                     data_group)

  def restore_latest(self, abstract_state, config=None, with_data=False):
    """Restores the newest step that loads as :class:`Restored` (all None
    for a workdir without checkpoints). The input position
    is :meth:`saved_position`'s (``with_data`` validates its files here).

    Each step's files are validated before Orbax reads them (a truncated
    TensorStore file can otherwise abort the process). A step that fails is
    logged with its reason; once an older step loads, the failed ones are
    moved to ``checkpoints/corrupt-<step>`` (never deleted). A failure of
    the storage rather than the files stops instead (an older step would
    silently lose ``checkpoint_every`` steps). A checkpoint of
    a different model config (:class:`CheckpointMismatchError`) is not damage
    and is raised as is. On several processes, a step that fails on any of
    them is skipped by all, so every process restores the same step.

    Raises:
      CheckpointRestoreError: no step loads; lists each step and its reason
        (nothing is moved).
      step_walk.CheckpointStorageError: reading a step failed in the storage
        (unavailable, throttled, denied: ``step_walk.is_storage_error``), not
        in its files; nothing is moved, and the same command retries.
      multihost.OtherProcessError: another process found a checkpoint of a
        different config, or process 0 could not list the steps again after
        damaged ones were moved aside (it raises that ``OSError``).
    """
    def check(step, _):
      # Each process reads its share of the arrays; the walk agrees.
      ckpt_files.validate_step(self.directory / str(step), with_data=with_data,
                               share=multihost.share())
      saved = (ckpt_files.saved_config(self.directory / str(step))
               if config is not None else None)
      if config is not None:
        fit.check_config_matches(saved, config)
      return saved

    def restore(step, saved):
      try:
        return saved, self.restore(step, abstract_state)
      except CheckpointMismatchError as e:
        raise CheckpointMismatchError(
            str(e) + fit.state_settings_note(saved, config)) from e

    # Validated first on every process: a step one of them cannot use is
    # skipped before any reads its gigabytes. The manager's steps are
    # process 0's listing on every process (ckpt_files.StepsOfProcess0).
    walk = first_readable(sorted(self.manager.all_steps(), reverse=True),
                          (check, restore), self.directory, "restored")
    failed = walk.failed
    if walk.step is not None:
      for bad, _ in failed:
        self._move_aside(bad)
      if failed:   # a fresh listing, without the steps moved aside
        self.manager.close()
        self.manager = self._new_manager()
      saved, state = walk.value
      return Restored(walk.step, state, saved)
    if failed:
      raise CheckpointRestoreError(
          f"No checkpoint under {self.directory} can be restored; tried:\n  " +
          "\n  ".join(f"step {s}: {r}" for s, r in failed) +
          "\nNothing was moved or deleted. Restore the files from a backup, "
          "or start from a fresh --workdir (--config.init_from=DIR loads "
          "parameters only).")
    return Restored(None, None, None)

  def _move_aside(self, step: int) -> None:
    """``checkpoints/<step>`` -> ``checkpoints/corrupt-<step>[.n]`` (kept for
    inspection; Orbax ignores non-numeric names)."""
    src = self.directory / str(step)

    def move():
      dst = self.directory / f"corrupt-{step}"
      n = 0
      while dst.exists():
        n += 1
        dst = self.directory / f"corrupt-{step}.{n}"
      src.rename(dst)
      logging.warning(
          "Moved damaged checkpoint %s to %s: kept for inspection, outside "
          "config.train.keep_checkpoints (nothing deletes it; it is about a "
          "whole checkpoint's size). Delete it when you no longer need it.",
          src, dst)
    # A failed rename stops every process (the others wait for process 0).
    multihost.on_process_0(move)

  def wait(self):
    """Waits for the save in flight; raises if it failed (this process's
    outcome: callable where the other processes may not be waiting)."""
    self.check(block=True)

  def close(self):
    """Waits for the save in flight and closes; every process calls it."""
    self.check(block=True, agree=True)
    self.manager.close()


def _note_other_mesh(step: int, saved: dict | None, abstract_state) -> None:
  """Logs that ``step`` was saved on another mesh than ``abstract_state``'s
  (another slice, or ``mesh.shape.data=-1`` resolved to another device
  count: the saved config shows neither)."""
  meshes = [getattr(getattr(a, "sharding", None), "mesh", None)
            for a in jax.tree_util.tree_leaves(abstract_state)]
  mesh = next((m for m in meshes if m is not None), None)
  if saved is None or mesh is None or saved == dict(mesh.shape):
    return
  logging.info(
      "Step %d was saved on mesh %s (%d devices); this run's is %s (%d "
      "devices): the state is resharded onto it, and the losses continue up "
      "to the rounding of sums split another way.", step, saved,
      math.prod(saved.values()), dict(mesh.shape), mesh.size)


def save_error_cause(error: BaseException) -> str:
  """A short cause for a failed save; names a full disk plainly (Orbax /
  TensorStore report it as ``RESOURCE_EXHAUSTED ... [os_error_code='28']``)."""
  for e in errors.causes(error):
    if (getattr(e, "errno", None) == errno.ENOSPC or "No space left" in str(e)
        or "os_error_code='28'" in str(e)):
      return f"no space left on device ({errors.first_line(e)})"
  return errors.first_line(error)
