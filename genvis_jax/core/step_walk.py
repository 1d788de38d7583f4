"""One walk over a run's checkpoint steps that every process takes alike.

:func:`first_readable` tries the steps newest first, each through its stages
(e.g. validate the files, then read them), and agrees every process's
outcome after each stage (:func:`agreed_outcome`): a step that fails on any
process is skipped by all, so all end on the same step and no process waits
alone in a collective. Resuming training (``core.checkpoint``) and loading a
run's weights (``core.run_weights``) both walk this way.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
from absl import logging
from etils import epath

from genvis_jax import errors
from genvis_jax.core import multihost
from genvis_jax.core.checkpoint_fit import CheckpointMismatchError


class Walk(NamedTuple):
  """:func:`first_readable`'s result: the first ``step`` read on every
  process (None: none was) with its ``value``, and the (step, reason) of
  each step skipped before it."""
  step: int | None
  value: Any
  failed: list[tuple[int, str]]


def first_readable(steps: list[int], stages, directory: epath.Path,
                   what: str = "read", log_skipped: bool = True) -> Walk:
  """The first of ``steps`` that every process reads, trying them in order.

  Each step runs ``stages`` in turn, ``value = stage(step, value)`` (from
  None); after each stage every process's outcome is agreed
  (:func:`agreed_outcome`), so a step that fails on any process is skipped
  by all and every process ends on the same step. ``steps`` must be the
  same list on every process (process 0's: ``multihost.ints_on_process_0``,
  or a manager's steps listed by ``checkpoint_files.StepsOfProcess0``); stages
  must not wait for the other processes (a process whose stage raised
  would skip the wait). Skipped steps are logged ("cannot be ``what``")
  unless not ``log_skipped`` (the caller reports them itself).

  Raises:
    CheckpointMismatchError: a stage on this process found a checkpoint of
      another config (not damage: no older step is tried).
    multihost.OtherProcessError: a stage on another process did.
  """
  failed = []
  for i, step in enumerate(steps):
    value, reason = None, None
    for stage in stages:
      error = None
      try:
        value = stage(step, value)
      except Exception as e:  # pylint: disable=broad-except
        error = e
      reason = agreed_outcome(step, error)
      if reason is not None:
        break
    if reason is None:
      return Walk(step, value, failed)
    if log_skipped:
      logging.warning("Checkpoint step %d in %s cannot be %s (%s); %s.", step,
                      directory, what, reason, "trying the previous step"
                      if i + 1 < len(steps) else "no older step is left")
    failed.append((step, reason))
  return Walk(None, None, failed)


def agreed_outcome(step: int, error: BaseException | None) -> str | None:
  """Every process's outcome of reading ``step`` (``error``: this one's, or
  None), agreed so that all restore the same step: a step that fails on one
  process is skipped by all (each process reads every file; a process that
  fell back alone would restore another step than the rest, or wait in
  another collective). Returns the reason to skip it, None to go on.

  Raises:
    CheckpointMismatchError: this process found a checkpoint of another
      config (not damage).
    multihost.OtherProcessError: another process did.
  """
  mismatch = isinstance(error, CheckpointMismatchError)
  codes = multihost.gather_ints(2 if mismatch else int(error is not None))
  if mismatch:
    raise error
  if (codes == 2).any():
    raise multihost.OtherProcessError(
        f"Processes {np.flatnonzero(codes == 2).tolist()} found that step "
        f"{step} was saved with another config (their logs say how).")
  if error is not None:
    return errors.first_line(error)
  if codes.any():
    return (f"it cannot be read on processes {np.flatnonzero(codes).tolist()} "
            "(their logs say why)")
  return None
