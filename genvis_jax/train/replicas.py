"""Processes of one data group feed the same rows: a check that they do.

Where an axis outside the batch rule spans hosts, processes whose devices
hold the same rows of the batch read the same examples
(``sharding.data_groups``), and ``jax.make_array_from_process_local_data``
takes their rows on trust. One process that skips a record its group-mates
read (an image its host could not open) would feed other examples from then
on, silently. Each such process keeps a running CRC of what it fed; at log
and save steps the group compares them and all processes stop on a mismatch.
Nothing is kept or compared where every group is one process (the usual
data-parallel meshes).
"""

from __future__ import annotations

import zlib

import jax
import numpy as np

from genvis_jax import errors
from genvis_jax.core import multihost

# Elements of each array hashed per step: a strided sample (a shifted stream
# changes it at once), so large image batches cost microseconds.
SAMPLE = 4096


class DataGroupMismatchError(errors.UserError, RuntimeError):
  """Processes of one data group fed different examples."""


class GroupCheck:
  """``update(local_batch)`` every step; ``check(step)`` at steps every
  process reaches (a collective where groups are shared)."""

  def __init__(self, data_group: tuple[int, int]):
    self.shared = data_group[1] < jax.process_count()
    self._crc = 0
    self._groups = (multihost.gather_ints(data_group[0])
                    if self.shared else None)

  def update(self, local_batch: dict) -> None:
    if not self.shared:
      return
    for key in sorted(local_batch):
      x = np.asarray(local_batch[key]).ravel()
      sample = np.ascontiguousarray(x[::max(1, x.size // SAMPLE)])
      self._crc = zlib.crc32(sample.tobytes(), zlib.crc32(key.encode(),
                                                          self._crc))

  def check(self, step: int) -> None:
    """Raises ``DataGroupMismatchError`` on every process if processes of one
    group fed different examples up to ``step``."""
    if not self.shared:
      return
    crcs = multihost.gather_ints(self._crc & 0x7FFFFFFF)
    for group in np.unique(self._groups):
      members = np.flatnonzero(self._groups == group)
      if len(set(crcs[members].tolist())) > 1:
        raise DataGroupMismatchError(
            f"Processes {members.tolist()} feed the same rows of the batch "
            f"(data group {group}), but read different examples by step "
            f"{step}: one skipped a record the others read (their logs name "
            "unreadable files). Make the data readable from every host, or "
            "use a mesh whose cross-host axes all split the batch "
            "(config.sharding.rules' batch rule).")
