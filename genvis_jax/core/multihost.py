"""Decisions that process 0 makes for every process of a multi-host job.

Checks that read shared storage (a workdir's records, token-file records)
run on process 0 only: the other processes could see a file half written, or
a transient storage error that process 0 did not, and then raise while the
rest wait at the next collective. Process 0's outcome is broadcast instead.
"""

from __future__ import annotations

from typing import Callable

import jax
import numpy as np
from jax.experimental import multihost_utils

from genvis_jax.errors import UserError


class OtherProcessError(UserError, RuntimeError):
  """Another process's check failed; raised on the rest so all stop."""


def broadcast_strings(strings: list[str], size: int = 4096) -> list[str]:
  """Process 0's ``strings`` on every process (UTF-8; longer than
  ``size - 1`` bytes is cut, which no path or message here is)."""
  buf = np.zeros((len(strings), size), np.uint8)
  for i, s in enumerate(strings):
    raw = s.encode()[:size - 1]
    buf[i, :len(raw)] = np.frombuffer(raw, np.uint8)
  buf = np.asarray(multihost_utils.broadcast_one_to_all(buf))
  return [bytes(row[:np.argmin(row)]).decode(errors="replace") for row in buf]


def check_on_process_0(check: Callable[[], object]) -> None:
  """Runs ``check`` on process 0 only; if it raises, process 0 re-raises its
  error and every other process raises ``OtherProcessError`` with its
  message, so all stop together. One process: just ``check()``."""
  if jax.process_count() == 1:
    check()
    return
  error, message = None, ""
  if jax.process_index() == 0:
    try:
      check()
    except Exception as e:  # pylint: disable=broad-except
      error, message = e, f"{type(e).__name__}: {str(e).strip()}"[:4000]
  message = broadcast_strings([message])[0]
  if error is not None:
    raise error
  if message:
    raise OtherProcessError(f"On process 0: {message}")


def gather_ints(value: int) -> np.ndarray:
  """Every process's ``value``, in process order: int (process_count,)."""
  if jax.process_count() == 1:
    return np.array([value])
  return np.asarray(multihost_utils.process_allgather(
      np.array([value], np.int32))).reshape(-1)
