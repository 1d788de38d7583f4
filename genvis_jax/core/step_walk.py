"""One walk over a run's checkpoint steps that every process takes alike.

:func:`first_readable` tries the steps newest first, each through its stages
(e.g. validate the files, then read them), and agrees every process's
outcome after each stage (:func:`agreed_outcome`): a step that fails on any
process is skipped by all, so all end on the same step and no process waits
alone in a collective. Resuming training (``core.checkpoint``) and loading a
run's weights (``core.run_weights``) both walk this way.
"""

from __future__ import annotations

import errno
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
    CheckpointStorageError: a stage here failed in the storage (no older
      step stands in for it); device memory ran out (jax's error).
    multihost.OtherProcessError: a stage on another process did either.
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
      reason = agreed_outcome(step, error, directory)
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


class CheckpointStorageError(errors.UserError, OSError):
  """Reading a checkpoint failed in the storage (unavailable, timed out,
  throttled, permission denied), not in its files: nothing is skipped or
  moved, and the same command retries."""


# Status names (TensorStore / gRPC, in messages) and exception class names
# (e.g. TensorFlow's gfile) of failures of the storage rather than the files.
STORAGE_STATUSES = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED",
                    "ABORTED", "CANCELLED", "PERMISSION_DENIED",
                    "UNAUTHENTICATED")
_STORAGE_CLASSES = ("UnavailableError", "DeadlineExceededError",
                    "ResourceExhaustedError", "AbortedError", "CancelledError",
                    "PermissionDeniedError", "UnauthenticatedError")


def is_storage_error(error: BaseException) -> bool:
  """Whether ``error`` (or one it was raised from) is the storage failing,
  which a retry may get past, rather than the files being damaged (a missing
  or truncated file, unparsable JSON: ValueError, FileNotFoundError; an I/O
  error, EIO): an OSError other than those, or a storage status (a GCS 503
  or 429 surfaces as TensorStore's UNAVAILABLE or RESOURCE_EXHAUSTED)."""
  for e in errors.causes(error):
    if isinstance(e, OSError) and not isinstance(
        e, (FileNotFoundError, IsADirectoryError, NotADirectoryError)) and (
            e.errno != errno.EIO):   # an unreadable sector: damage
      return True
    text = str(e)
    if type(e).__name__ in _STORAGE_CLASSES or any(
        text.startswith(s) or f"{s}:" in text for s in STORAGE_STATUSES):
      return True
  return False


# Outcome codes agreed between processes.
_READ, _DAMAGED, _RAISED, _STORAGE = range(4)


def agreed_outcome(step: int, error: BaseException | None,
                   directory: epath.Path | str = "") -> str | None:
  """Every process's outcome of reading ``step`` (``error``: this one's, or
  None), agreed so that all restore the same step: a step that fails on one
  process is skipped by all (processes read their share of its files; a
  process that fell back alone would restore another step than the rest, or
  wait in another collective). Returns the reason to skip it, None to go on.

  Raises:
    CheckpointMismatchError: this process found a checkpoint of another
      config (not damage).
    jax's runtime error: this process ran out of device memory reading it
      (not damage either).
    CheckpointStorageError: reading it failed in the storage here
      (``is_storage_error``): an older step would silently stand in for it.
    multihost.OtherProcessError: another process found either.
  """
  if error is None:
    code = _READ
  elif isinstance(error, CheckpointMismatchError) or errors.out_of_memory(
      error, chain=True):
    code = _RAISED    # another config, or no device memory: not damage
  else:
    code = _STORAGE if is_storage_error(error) else _DAMAGED
  codes = multihost.gather_ints(code)
  if code == _RAISED:
    raise error
  if code == _STORAGE:
    raise CheckpointStorageError(
        f"Reading checkpoint step {step} in {directory} failed in the storage "
        f"({errors.first_line(error)}), not in its files: nothing was "
        "skipped or moved. Run the same command again (check the access "
        "rights if it persists).") from error
  if (codes == _RAISED).any():
    raise multihost.OtherProcessError(
        f"Processes {np.flatnonzero(codes == _RAISED).tolist()} found that "
        f"step {step} was saved with another config, or ran out of device "
        "memory reading it (their logs say which).")
  if (codes == _STORAGE).any():
    raise multihost.OtherProcessError(
        f"Processes {np.flatnonzero(codes == _STORAGE).tolist()} could not "
        f"read checkpoint step {step} from the storage (their logs say why); "
        "nothing was skipped or moved. Run the same command again.")
  if error is not None:
    return errors.first_line(error)
  if codes.any():
    return (f"it cannot be read on processes {np.flatnonzero(codes).tolist()} "
            "(their logs say why)")
  return None
