"""Whole-file writes and reads on a local disk or an object store (``gs://``):
sample parts, ``samples.npz``, reference batches, ``metrics.json``, grids.

Paths go through ``etils.epath`` (TensorFlow's ``gfile`` for ``gs://`` where
TensorFlow is installed, as on the TPU VMs), so a ``gs://`` workdir holds
what a local one would. Plain ``open`` / ``os`` calls would instead write a
local folder named ``gs:`` on process 0's disk and report success.
"""

from __future__ import annotations

import contextlib
import os
import re
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
    with tempfile.TemporaryDirectory(prefix="genvis_jax_upload_") as tmp:
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


# ``write_whole``'s local temporary file: ``name.<pid>.tmp[.ext]``.
_TEMPORARY = re.compile(r"^.+\.(\d+)\.tmp(\.[^.]*)?$")


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:   # another user's live process
    return True
  return True


def remove_stale_temporaries(folder) -> list[str]:
  """Removes ``write_whole``'s temporary files in the local ``folder`` whose
  writer is no longer running (a process killed mid-write, by an OOM kill
  or a preemption: 9.8 GB for a 50k ``samples.npz``, one more per crash);
  returns their names. Call it under the workdir's lock (no other run
  writes there), on the host that writes. Nothing on an object store,
  where the temporary files are in ``TMPDIR``'s own folders."""
  folder = os.fspath(folder)
  if is_remote(folder) or not os.path.isdir(folder):
    return []
  gone = []
  for name in sorted(os.listdir(folder)):
    m = _TEMPORARY.match(name)
    if m and int(m.group(1)) != os.getpid() and not _alive(int(m.group(1))):
      with contextlib.suppress(FileNotFoundError):
        os.remove(os.path.join(folder, name))
        gone.append(name)
  if gone:
    logging.warning("Removed %d temporary file(s) that a run killed while "
                    "writing left in %s: %s", len(gone), folder,
                    ", ".join(gone[:3]))
  return gone


# What reading a damaged ``.npz`` raises: cut short (``BadZipFile``,
# ``EOFError``), a failed read (``OSError``), a damaged member or header
# (``ValueError``).
NPZ_READ_ERRORS = (zipfile.BadZipFile, EOFError, OSError, ValueError)


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
  with tempfile.TemporaryDirectory(prefix="genvis_jax_download_") as tmp:
    local = os.path.join(tmp, epath.Path(path).name)
    epath.Path(path).copy(local)
    yield local


def makedirs(path) -> None:
  """Creates the folder ``path`` and its parents (on an object store, where
  folders are only name prefixes, nothing is needed)."""
  if not is_remote(path):
    os.makedirs(path, exist_ok=True)
