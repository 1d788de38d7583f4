"""Whole-file writes and reads on a local disk or an object store (``gs://``):
sample parts, ``samples.npz``, reference batches, ``metrics.json``, grids.

Paths go through ``etils.epath`` (TensorFlow's ``gfile`` for ``gs://`` where
TensorFlow is installed, as on the TPU VMs), so a ``gs://`` workdir holds
what a local one would. Plain ``open`` / ``os`` calls would instead write a
local folder named ``gs:`` on process 0's disk and report success.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import re
import shutil
import tempfile
import zipfile
from typing import BinaryIO, Callable, Iterator

from absl import logging
from etils import epath


def is_remote(path) -> bool:
  """Whether ``path`` is a URL (``gs://``, ``s3://``...), not a local path."""
  return "://" in os.fspath(path)


def kvstore_url(folder) -> str:
  """TensorStore's URL of the folder ``folder`` (``gs://.../``, or
  ``file://`` and the absolute local path), ending in "/"."""
  text = os.fspath(folder).rstrip("/") + "/"
  return text if is_remote(text) else "file://" + os.path.abspath(text) + "/"


def write_whole(path, write: Callable[[str], object]) -> None:
  """Writes ``path`` whole or not at all: ``write(tmp)`` fills a local file,
  which becomes ``path`` once complete. Creates the folder.

  Local: ``tmp`` lies beside ``path`` (``name.<pid>.tmp.ext``: two
  processes writing the same file do not share it) and is renamed into
  place (atomic on one file system). Object store: ``tmp`` is in a local
  temporary folder and is uploaded to ``path`` (an object appears whole when
  its upload completes; a rename there is a copy and a delete). The local
  disk then needs room for the file twice (TensorFlow's GCS writer stages
  its own copy); ``TMPDIR`` chooses the disk. A ``write`` that raises
  leaves ``path`` as it was and no temporary file.
  """
  path = os.fspath(path)
  if is_remote(path):
    target = epath.Path(path)
    with tempfile.TemporaryDirectory(
        prefix=f"genvis_jax_upload_{os.getpid()}_") as tmp:
      local = os.path.join(tmp, target.name)
      write(local)
      epath.Path(local).copy(target, overwrite=True)
    return
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  root, ext = os.path.splitext(path)
  # Not ending in a digit: a part's temporary file never looks like a part.
  tmp = f"{root}.{os.getpid()}.tmp{ext}"
  try:
    write(tmp)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):   # a write that failed leaves nothing behind
      os.remove(tmp)
    raise


# ``write_whole``'s local temporary file of the outputs it writes beside
# themselves: ``name.<pid>.tmp.<npz|png|json>`` (pid_max is at most 2**22).
_TEMPORARY = re.compile(r"^.+\.(\d{1,7})\.tmp\.(npz|png|json)$")
# Its (and ``local_copy``'s) folders in TMPDIR: ``genvis_jax_<kind>_<pid>_*``.
_TRANSFER = re.compile(r"^genvis_jax_(upload|download)_(\d{1,7})_")


def _pid_alive(pid: int) -> bool:
  """Whether process ``pid`` runs on this host (unknown: alive)."""
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except (PermissionError, OverflowError):   # another user's; not a pid
    return True
  return True


def pid_gone(pid: int) -> bool:
  """Whether ``pid`` is another process than this one and runs on this host
  no longer (a killed writer or lease holder)."""
  return pid != os.getpid() and not _pid_alive(pid)


def _remove_stale(folder: str, pattern: re.Pattern, group: int,
                  is_kind: Callable[[str], bool], remove: Callable[[str], object],
                  what: str) -> list[str]:
  """Removes the entries of ``folder`` matching ``pattern`` whose pid
  (``group``) is no process of this host but this one, and ``is_kind``
  (not links); their names."""
  gone = []
  for name in sorted(os.listdir(folder)):
    m, path = pattern.match(name), os.path.join(folder, name)
    if (m and pid_gone(int(m.group(group))) and is_kind(path)
        and not os.path.islink(path)):
      with contextlib.suppress(FileNotFoundError):
        remove(path)
        gone.append(name)
  if gone:
    logging.warning("Removed %d %s that a run killed midway left in %s: %s",
                    len(gone), what, folder, ", ".join(gone[:3]))
  return gone


def remove_stale_temporaries(folder) -> list[str]:
  """Removes ``write_whole``'s temporary files in the local ``folder`` whose
  writer is no longer running (a process killed mid-write, by an OOM kill
  or a preemption: 9.8 GB for a 50k ``samples.npz``, one more per crash);
  returns their names. Only regular files named as ``write_whole`` names
  them, of the outputs it writes (``.npz``, ``.png``, ``.json``). Call it
  under the workdir's lock (no other run writes there), on the host that
  writes there (process 0). Nothing on an object store, whose temporary
  files are in ``TMPDIR`` (``remove_stale_transfers``)."""
  folder = os.fspath(folder)
  if is_remote(folder) or not os.path.isdir(folder):
    return []
  return _remove_stale(folder, _TEMPORARY, 1, os.path.isfile, os.remove,
                       "temporary file(s)")


def remove_stale_transfers() -> list[str]:
  """Removes the folders in ``TMPDIR`` that ``write_whole`` (uploads to an
  object store) and ``local_copy`` (downloads) made for processes of this
  host no longer running; returns their names. Each host calls it for its
  own ``TMPDIR``."""
  return _remove_stale(tempfile.gettempdir(), _TRANSFER, 2, os.path.isdir,
                       functools.partial(shutil.rmtree, ignore_errors=True),
                       "transfer folder(s)")


# What reading a damaged ``.npz`` raises: cut short (``BadZipFile``,
# ``EOFError``), a failed read (``OSError``), a damaged member or header
# (``ValueError``).
NPZ_READ_ERRORS = (zipfile.BadZipFile, EOFError, OSError, ValueError)


def file_sha256(path, block: int = 1 << 24) -> str:
  """Hex SHA-256 of a local or ``gs://`` file's bytes (16 MiB blocks)."""
  h = hashlib.sha256()
  with epath.Path(path).open("rb") as f:
    for chunk in iter(lambda: f.read(block), b""):
      h.update(chunk)
  return h.hexdigest()


def open_read(path) -> BinaryIO:
  """``path`` opened for binary reading (seekable: ``np.load`` and
  ``zipfile`` read ``.npz`` members from it)."""
  return epath.Path(path).open("rb")


@contextlib.contextmanager
def local_copy(path) -> Iterator[str]:
  """``path`` itself where it is local; a remote file (``gs://``) copied to a
  local temporary file for the ``with`` block (the weight readers need a
  local file: torch's zip reader, safetensors, numpy). The copy is removed
  after it; arrays still mapped from it stay readable (the file lives on
  until they are freed)."""
  path = os.fspath(path)
  if not is_remote(path):
    yield path
    return
  with tempfile.TemporaryDirectory(
      prefix=f"genvis_jax_download_{os.getpid()}_") as tmp:
    local = os.path.join(tmp, epath.Path(path).name)
    epath.Path(path).copy(local)
    yield local


def makedirs(path) -> None:
  """Creates the folder ``path`` and its parents (on an object store, where
  folders are only name prefixes, nothing is needed)."""
  if not is_remote(path):
    os.makedirs(path, exist_ok=True)
