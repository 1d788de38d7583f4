"""Decisions that process 0 makes for every process of a multi-host job.

Checks that read shared storage (a workdir's records, token-file records)
and writes to it (sample parts) run on process 0 only (``on_process_0``):
the other processes could see a file half written, or a transient storage
error that process 0 did not, and then raise while the rest wait at the next
collective. Process 0's outcome is broadcast instead, so an error stops
every process at once. ``check_agree`` stops a job whose processes were
started with different settings.
"""

from __future__ import annotations

import hashlib
import json
from typing import Callable

import jax
import numpy as np
from jax.experimental import multihost_utils

from genvis_jax.core import files
from genvis_jax.core import settings as settings_lib
from genvis_jax.errors import OutputWriteError, UserError, first_line


class OtherProcessError(UserError, RuntimeError):
  """Another process's check failed; raised on the rest so all stop."""


def share() -> tuple[int, int]:
  """``(process_index, process_count)``: this process's share of work that
  every process of the job does a part of (e.g. ``check_ocdbt``'s reads)."""
  return jax.process_index(), jax.process_count()


def broadcast_strings(strings: list[str], size: int = 4096) -> list[str]:
  """Process 0's ``strings`` on every process (UTF-8; longer than
  ``size - 1`` bytes is cut, which no path or message here is)."""
  buf = np.zeros((len(strings), size), np.uint8)
  for i, s in enumerate(strings):
    raw = s.encode()[:size - 1]
    buf[i, :len(raw)] = np.frombuffer(raw, np.uint8)
  buf = np.asarray(multihost_utils.broadcast_one_to_all(buf))
  return [bytes(row[:np.argmin(row)]).decode(errors="replace") for row in buf]


def broadcast_ints(values: list[int]) -> list[int]:
  """Process 0's ``values`` (ints in int32 range, any length) on every
  process."""
  if jax.process_count() == 1:
    return [int(v) for v in values]
  n = int(np.asarray(multihost_utils.broadcast_one_to_all(
      np.array([len(values)], np.int32)))[0])
  buf = np.zeros(n, np.int32)
  if jax.process_index() == 0:
    buf[:] = values
  return np.asarray(multihost_utils.broadcast_one_to_all(buf)).reshape(
      -1).tolist()


def console(text: str) -> None:
  """Prints ``text`` (a mode's console line) on process 0 only: a pod's
  processes, whose output a launcher gathers, each say it otherwise. Each
  process's log keeps its own lines."""
  if jax.process_index() == 0:
    print(text, flush=True)


def on_process_0(fn: Callable[[], object]) -> None:
  """Runs ``fn`` (a check of shared storage, or a write to it) on process 0
  only; if it raises, process 0 re-raises its error and every other process
  raises ``OtherProcessError`` with its message, so all stop together
  instead of waiting for process 0 at the next collective. One process:
  just ``fn()``."""
  if jax.process_count() == 1:
    fn()
    return
  error, message = None, ""
  if jax.process_index() == 0:
    try:
      fn()
    except Exception as e:  # pylint: disable=broad-except
      error, message = e, f"{type(e).__name__}: {str(e).strip()}"[:4000]
  message = broadcast_strings([message])[0]
  if error is not None:
    raise error
  if message:
    raise OtherProcessError(f"On process 0: {message}")


def write_on_process_0(path: str, write: Callable[[str], object]) -> None:
  """Process 0 writes ``path`` (local or ``gs://``) whole or not at all:
  ``write(tmp)`` fills a local temporary file that then becomes ``path``
  (``files.write_whole``; ``on_process_0``: a failure stops every process).
  Creates the folder. Raises ``errors.OutputWriteError`` (an ``OSError``)
  naming ``path`` when it cannot be written (a full disk)."""

  def whole():
    try:
      files.write_whole(path, write)
    except OSError as e:
      raise OutputWriteError(
          f"Writing {path} failed ({first_line(e)}). Free space (or fix the "
          "folder) and run the same command.") from e
  on_process_0(whole)


def gather_ints(value: int) -> np.ndarray:
  """Every process's ``value``, in process order: int (process_count,)."""
  if jax.process_count() == 1:
    return np.array([value])
  return np.asarray(multihost_utils.process_allgather(
      np.array([value], np.int32))).reshape(-1)


def gather_or_raise(value: int, error: BaseException | None,
                    failed: str) -> np.ndarray:
  """``gather_ints(value)`` where this process may have failed with
  ``error``: it raises ``error``, and every other process raises
  :class:`OtherProcessError` ``"Processes [ids] <failed>"``, so no process
  waits alone in a later collective. Returns the values when none failed.
  ``value`` must be >= 0."""
  values = gather_ints(-1 if error is not None else value)
  if error is not None:
    raise error
  if (values < 0).any():
    raise OtherProcessError(
        f"Processes {np.flatnonzero(values < 0).tolist()} {failed}")
  return values


def run_everywhere(fn: Callable[[], object], failed: str):
  """``fn()`` on every process, its outcome agreed: returns its value where
  it returned on every process. Where it raised on any, that process raises
  its own error and every other one :class:`OtherProcessError`
  ``"Processes [ids] <failed>"``, so none waits alone in a later
  collective. ``fn`` must not itself wait for the other processes."""
  value, error = None, None
  try:
    value = fn()
  except Exception as e:  # pylint: disable=broad-except
    error = e
  gather_or_raise(0, error, failed)
  return value


def ints_on_process_0(fn: Callable[[], list[int]]) -> list[int]:
  """``fn()`` (ints in int32 range) as process 0 computes it, on every
  process: what process 0 sees of shared storage (a listing, a decision),
  which every process must follow alike. Its error stops every process
  (:func:`on_process_0`)."""
  out = []

  def run():
    out.extend(int(v) for v in fn())
    if any(not -2**31 <= v < 2**31 for v in out):   # checked on process 0
      raise ValueError(f"{out} do not fit int32; cannot broadcast them")
  on_process_0(run)
  return broadcast_ints(out)


def string_on_process_0(fn: Callable[[], str]) -> str:
  """``fn()`` (a string of under 4 KB) as process 0 computes it, on every
  process (e.g. what it reads of a file only its disk holds). Its error
  stops every process (:func:`on_process_0`)."""
  out = [""]

  def run():
    out[0] = fn()
  on_process_0(run)
  return broadcast_strings(out)[0]


def decided_on_process_0(fn: Callable[[], int]) -> int:
  """:func:`ints_on_process_0` of one int."""
  return ints_on_process_0(lambda: [fn()])[0]


def check_agree(settings, what: str, fix: str = (
    "every process of a job must get the same flags and see the same data "
    "and weights. Compare their command lines, then run again.")) -> None:
  """Raises ``OtherProcessError`` on every process unless every process
  passes equal ``settings`` (JSON-serialisable), e.g. the settings that
  decide its output: one process started with other flags, or reading a
  data folder copied incompletely to its host, would otherwise write
  something else than the rest without a word. ``what`` names them; ``fix``
  ends the message."""
  if jax.process_count() == 1:
    return
  text = json.dumps(settings, sort_keys=True, default=str)
  digest = int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")
  digests = gather_ints(digest & 0x7FFFFFFF)
  differ = np.flatnonzero(digests != digests[0]).tolist()
  if not differ:
    return
  # Each differing process names its differences from process 0's record.
  try:
    diff = settings_lib.differences(
        json.loads(broadcast_strings([text], size=1 << 16)[0]),
        json.loads(text), names=("process 0", "this process"))
  except ValueError:   # process 0's record was longer than the buffer
    diff = []
  detail = f" ({settings_lib.shorten(diff, 5)})" if diff else ""
  raise OtherProcessError(
      f"Processes {differ} run with other {what} than process 0{detail}; "
      + fix)
