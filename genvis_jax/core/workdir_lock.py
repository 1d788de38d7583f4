"""One run per workdir at a time.

Two runs in one workdir (a command started twice, in two terminals) would
save checkpoints over each other's steps and resume from each other's
state, or draw and write the same sample parts twice. While it runs, a
training, sampling, evaluation or demo run holds an exclusive ``flock`` on
``<workdir>/.genvis_lock`` (process 0, local and network file systems that
support it; a pre-tokenizing run on its token folder's, ``modes.lock_dir``);
the operating system releases it when the process ends, however it ends, so
a crashed run leaves no stale lock behind. A lock in a folder of outputs
(the token files, which are copied on as a folder) is removed when its run
ends (``hold(..., remove=True)``). Object stores (``gs://``) have no such
lock: there process 0 holds a lease object (``core.lease``), renewed while
the run lives and deleted when it ends.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import os
import socket

from absl import logging

from genvis_jax import errors
from genvis_jax.core import files
from genvis_jax.core import lease as lease_lib
from genvis_jax.core import multihost

LOCK_NAME = ".genvis_lock"


class WorkdirBusyError(errors.UserError, RuntimeError):
  """Another run holds the workdir."""


@contextlib.contextmanager
def hold(workdir: str, what: str = "training run", *, remove: bool = False):
  """Holds ``workdir``'s lock while the block runs (process 0 takes it; its
  refusal stops every process). The lock file names the holder (``what``,
  process id, host, start time) for the message another run gets.
  ``remove``: the lock file goes when the block ends (however it ends; a
  killed process leaves it, to be taken and removed by the next run), for a
  folder of outputs that is copied on as a whole.

  Raises:
    WorkdirBusyError: another process holds it; names that process.
  """
  if files.is_remote(workdir):   # an object store: no file locks, a lease
    with _leased(workdir, what):
      yield
    return
  path = os.path.join(workdir, LOCK_NAME)
  held = []

  def take():
    for _ in range(10):   # bounded: a file system whose inodes never match
      fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        holder = (os.read(fd, 512).decode("utf-8", "replace").strip()
                  or "unknown")
        os.close(fd)
        raise WorkdirBusyError(
            f"{workdir} is in use by another run ({holder}). Wait for it to "
            "end (or stop it), or use another --workdir.") from None
      except OSError as e:   # a file system without locks: run unguarded
        os.close(fd)
        logging.warning("Cannot lock %s (%s); nothing keeps a second run out "
                        "of this workdir.", path, errors.first_line(e))
        return
      if _is_file_at(fd, path):
        break
      # Locked a file its holder removed (remove=True) between our open and
      # our lock: another run may hold a new one at the path; lock that.
      os.close(fd)
    else:
      logging.warning("Cannot lock %s (it changes under every lock taken); "
                      "nothing keeps a second run out of this workdir.", path)
      return
    since = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    os.ftruncate(fd, 0)
    os.write(fd, f"{what}: process {os.getpid()} on {socket.gethostname()}, "
                 f"since {since}\n".encode())
    held.append(fd)

  multihost.on_process_0(take)
  try:
    yield
  finally:
    for fd in held:
      if remove:   # while still held: a run that opened it sees it gone
        with contextlib.suppress(OSError):
          os.remove(path)
      os.close(fd)   # releases the lock


@contextlib.contextmanager
def _leased(workdir: str, what: str):
  """``hold`` on an object store: process 0 holds ``lease.Lease``."""
  held = []

  def take():
    leased = lease_lib.Lease(workdir, what)
    try:
      leased.take()
    except lease_lib.LeaseBusyError as e:
      raise WorkdirBusyError(str(e)) from None
    held.append(leased)

  multihost.on_process_0(take)
  try:
    yield
  finally:
    for leased in held:
      leased.release()


def _is_file_at(fd: int, path: str) -> bool:
  """Whether the open file ``fd`` is still the one at ``path``."""
  try:
    at, held = os.stat(path), os.fstat(fd)
  except OSError:
    return False
  return (at.st_dev, at.st_ino) == (held.st_dev, held.st_ino)
