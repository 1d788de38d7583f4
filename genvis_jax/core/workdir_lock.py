"""One run per workdir at a time.

Two runs in one workdir (a command started twice, in two terminals) would
save checkpoints over each other's steps and resume from each other's
state, or draw and write the same sample parts twice. While it runs, a
training, sampling, evaluation or demo run holds an exclusive ``flock`` on
``<workdir>/.genvis_lock`` (process 0, local and network file systems that
support it; a pre-tokenizing run on its token folder's, ``modes.lock_dir``);
the operating system releases it when the process ends, however it ends, so
a crashed run leaves no stale lock behind. Object stores (``gs://``) have no
such lock: there the launcher's run names keep runs apart.
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
from genvis_jax.core import multihost

LOCK_NAME = ".genvis_lock"


class WorkdirBusyError(errors.UserError, RuntimeError):
  """Another run holds the workdir."""


@contextlib.contextmanager
def hold(workdir: str, what: str = "training run"):
  """Holds ``workdir``'s lock while the block runs (process 0 takes it; its
  refusal stops every process). The lock file names the holder (``what``,
  process id, host, start time) for the message another run gets.

  Raises:
    WorkdirBusyError: another process holds it; names that process.
  """
  if files.is_remote(workdir):   # an object store: no file locks
    yield
    return
  path = os.path.join(workdir, LOCK_NAME)
  held = []

  def take():
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.read(fd, 512).decode("utf-8", "replace").strip() or "unknown"
      os.close(fd)
      raise WorkdirBusyError(
          f"{workdir} is in use by another run ({holder}). Wait for it to "
          "end (or stop it), or use another --workdir.") from None
    except OSError as e:   # a file system without locks: run unguarded
      os.close(fd)
      logging.warning("Cannot lock %s (%s); nothing keeps a second run out of "
                      "this workdir.", path, errors.first_line(e))
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
      os.close(fd)   # releases the lock
