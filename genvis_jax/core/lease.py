"""An object-store workdir's lock: a lease object (``.genvis_lease``).

Object stores (``gs://``) have no file locks, and two runs started on one
bucket workdir (the same config launched on a second slice) wrote each
other's checkpoint steps: one run's work silently lost, or both stopped
with errors blaming the disk. A run creates the lease only where none
exists (a conditional write, TensorStore's ``if_equal``: GCS's
``ifGenerationMatch``), renews it every ``HEARTBEAT_S`` and deletes it when
it ends. Another run finds it fresh and is refused, naming the holder; a
lease whose process no longer runs on this host (killed: a second Ctrl-C,
an OOM kill, ``kill -9``), or not renewed for ``STALE_S`` (its host gone: a
Spot slice taken back), is taken over with a warning.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import threading
import time

import tensorstore as ts
from absl import logging

from genvis_jax import errors
from genvis_jax.core import files

LEASE_NAME = ".genvis_lease"
HEARTBEAT_S = 60.0
STALE_S = 600.0   # 10 heartbeats missed: its run is gone


class LeaseBusyError(errors.UserError, RuntimeError):
  """Another run holds the workdir's lease."""


class Lease:
  """The lease of ``folder`` for a run described by ``what``.

  ``take()`` creates it (or takes over a stale one), then renews it on a
  daemon thread; ``release()`` deletes it if this run still holds it.
  ``clock`` gives seconds since the epoch (tests). The holders' clocks are
  compared: object-store hosts keep theirs in sync (NTP on GCE).
  """

  def __init__(self, folder: str, what: str, *, clock=time.time,
               heartbeat_s: float = HEARTBEAT_S, stale_s: float = STALE_S):
    self.folder, self.what, self.clock = folder, what, clock
    self.heartbeat_s, self.stale_s = heartbeat_s, stale_s
    self._kv = ts.KvStore.open(files.kvstore_url(folder)).result()
    self._generation = b""
    self._stop = threading.Event()
    self._thread = None
    self.since = datetime.datetime.now().astimezone().isoformat(
        timespec="seconds")

  @property
  def path(self) -> str:
    return self.folder.rstrip("/") + "/" + LEASE_NAME

  def _record(self) -> bytes:
    return json.dumps({"what": self.what, "pid": os.getpid(),
                       "host": socket.gethostname(), "since": self.since,
                       "renewed": self.clock()}).encode()

  def take(self) -> None:
    """Raises ``LeaseBusyError`` naming the holder while its lease is
    fresh (or another run created one at the same moment)."""
    found = self._kv.read(LEASE_NAME).result()
    if found.state == "value":
      holder = _parse(found.value)
      age = self.clock() - float(holder.get("renewed", 0) or 0)
      # Its holder on this host and gone (killed: no unwinding deleted it,
      # as a local lock is released): no need to wait until it is stale.
      gone_here = (holder.get("host") == socket.gethostname()
                   and isinstance(holder.get("pid"), int)
                   and files.pid_gone(holder["pid"]))
      if age < self.stale_s and not gone_here:
        raise LeaseBusyError(
            f"{self.folder} is in use by another run ({_describe(holder)}, "
            f"renewed {age:.0f} s ago; {self.path}). Wait for it to end (or "
            "stop it), or use another --workdir. If that run is gone, its "
            f"lease is taken over {self.stale_s:.0f} s after its last renewal, "
            f"or delete {self.path}.")
      logging.warning("Taking over %s: its run (%s) last renewed it %.0f s "
                      "ago and %s.", self.path, _describe(holder), age,
                      "no longer runs on this host" if gone_here
                      else "is taken to be gone")
    written = self._kv.write(LEASE_NAME, self._record(),
                             if_equal=found.stamp.generation).result()
    if not written.generation:   # the condition failed: another run won
      raise LeaseBusyError(
          f"{self.folder} was taken by another run at the same moment "
          f"({self.path}). Use another --workdir, or wait for it to end.")
    self._generation = written.generation
    self._thread = threading.Thread(target=self._renew, daemon=True,
                                    name="genvis-lease")
    self._thread.start()

  def _renew(self) -> None:
    while not self._stop.wait(self.heartbeat_s):
      try:
        written = self._kv.write(LEASE_NAME, self._record(),
                                 if_equal=self._generation).result()
      except Exception as e:  # pylint: disable=broad-except
        logging.warning("Could not renew %s (%s); retrying.", self.path,
                        errors.first_line(e))
        continue
      if not written.generation:
        logging.error(
            "%s was taken over by another run (this one did not renew it for "
            "%.0f s): two runs now write %s. Stop one of them.", self.path,
            self.stale_s, self.folder)
        return
      self._generation = written.generation

  def release(self) -> None:
    """Stops renewing and deletes the lease while this run holds it."""
    self._stop.set()
    if self._thread is not None:
      self._thread.join()
    if self._generation:
      try:
        self._kv.write(LEASE_NAME, None, if_equal=self._generation).result()
      except Exception as e:  # pylint: disable=broad-except
        logging.warning("Could not delete %s (%s): the next run in this "
                        "workdir takes it over %.0f s after its last renewal.",
                        self.path, errors.first_line(e), self.stale_s)
      self._generation = b""


def _parse(value: bytes) -> dict:
  try:
    record = json.loads(value)
  except ValueError:
    return {}
  return record if isinstance(record, dict) else {}


def _describe(holder: dict) -> str:
  if not holder:
    return "unknown holder"
  return (f"{holder.get('what', 'a run')}: process {holder.get('pid', '?')} on "
          f"{holder.get('host', '?')}, since {holder.get('since', '?')}")
