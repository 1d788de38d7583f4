"""Saving checkpoints in the real training loop: a failed save (full disk,
in the foreground or the background write) stops the run with one message
and keeps the newest complete step; a save's background write overlaps the
next steps; unfinished saves are named as Orbax finalizes them; storage
errors are told from damage (damage falls back: test_reliability.py); a grid
PNG's temporary left by a killed run is removed on resume."""

import errno
import json
import logging
import os
import re
import subprocess
import sys
import threading
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

from genvis_jax import errors as errors_lib
from genvis_jax.core import checkpoint as ckpt_lib
from genvis_jax.core import step_walk
from genvis_jax.errors import UserError
from genvis_jax.train import trainer as trainer_lib
from tests import small_run
from tests.small_run import config


def test_storage_errors_are_told_from_damage(monkeypatch):
  storage = [OSError("503 Service Unavailable"), TimeoutError("read"),
             PermissionError(13, "denied"),
             ValueError("DEADLINE_EXCEEDED: reading gs://b/x"),
             type("PermissionDeniedError", (Exception,), {})("gs://b")]
  damage = [FileNotFoundError("state/_METADATA"), ValueError("x is empty"),
            json.JSONDecodeError("Expecting value", "", 0),
            ValueError("DATA_LOSS: Error reading ... truncated"),
            OSError(errno.EIO, "Input/output error")]   # a bad sector
  wrapped = ValueError("state/d/1 is unreadable")
  wrapped.__cause__ = ConnectionResetError("reset by peer")
  assert all(step_walk.is_storage_error(e) for e in storage + [wrapped])
  assert not any(step_walk.is_storage_error(e) for e in damage)
  # Device memory running out under a library's wrapper is neither.
  oom = type("JaxRuntimeError", (RuntimeError,), {})(
      "RESOURCE_EXHAUSTED: Out of memory allocating 4294967296 bytes")
  wrapped_oom = ValueError("restore failed")
  wrapped_oom.__cause__ = oom
  assert errors_lib.out_of_memory(
      wrapped_oom, chain=True) and not errors_lib.out_of_memory(wrapped_oom)
  monkeypatch.setattr(step_walk.multihost, "gather_ints",
                      lambda v: np.array([v]))
  with pytest.raises(ValueError, match="restore failed"):
    step_walk.agreed_outcome(6, wrapped_oom)


def test_unfinished_saves_are_named_as_orbax_finalizes_them(tmp_path,
                                                            monkeypatch):
  """Local saves are renamed from a temporary folder; gs:// saves are
  written in place and finalized by a commit file (Orbax's
  is_path_finalized, emulated here)."""
  folder = tmp_path / "checkpoints"
  for name in ("3", "6", "9.orbax-checkpoint-tmp-1700000000", "corrupt-6"):
    (folder / name).mkdir(parents=True)
  assert ckpt_lib.unfinished_saves(folder) == [
      "9.orbax-checkpoint-tmp-1700000000"]
  (folder / "3" / "commit_success.txt").write_text("")
  monkeypatch.setattr(ckpt_lib.ocp.step, "is_path_finalized",
                      lambda p: (p / "commit_success.txt").exists())
  assert ckpt_lib.unfinished_saves(folder) == [
      "6", "9.orbax-checkpoint-tmp-1700000000"]
  assert ckpt_lib.unfinished_saves(tmp_path / "none") == []


class _NoSpaceFuture:
  """A background write that fails the way TensorStore reports a full disk."""

  def result(self, timeout=None):
    del timeout
    raise ValueError(
        'RESOURCE_EXHAUSTED: Error writing local file "x/_sharding": Failed '
        "to write 14723 bytes to file 5: No space left on device "
        "[os_error_code='28']")


@pytest.mark.parametrize("where", [
    "background", "foreground", "foreground_after_write"])
def test_failed_save_stops_training_with_one_message(tmp_path, monkeypatch,
                                                      where):
  orig = ocp.PyTreeCheckpointHandler.async_save
  calls = []

  async def failing_second_save(self, *args, **kwargs):
    calls.append(1)
    if len(calls) >= 2 and where == "foreground":
      # Before Orbax starts writing: no commit thread of this save outlives
      # the failure (one would call into Orbax's closed event loop).
      raise OSError(28, "No space left on device")
    futures = await orig(self, *args, **kwargs)
    if len(calls) < 2:
      return futures
    if where == "foreground_after_write":
      # The writes end before the failure is reported: left running, they
      # would fail into the removed tmp folder some tests later, and their
      # unretrieved exceptions are logged from the garbage collector (in
      # CPython 3.11 that can break an ast.parse running at that moment,
      # gh-106905).
      for f in futures or []:
        f.result()
      raise OSError(28, "No space left on device")
    return list(futures or []) + [_NoSpaceFuture()]

  monkeypatch.setattr(ocp.PyTreeCheckpointHandler, "async_save",
                      failing_second_save)
  seen = []
  wd = str(tmp_path / "wd")
  with pytest.raises(ckpt_lib.CheckpointSaveError) as e:
    trainer_lib.train_loop(config(9), wd,
                           on_log=lambda s, _: seen.append(s))
  msg = str(e.value)
  assert isinstance(e.value, UserError)
  assert "step 6" in msg and "no space left on device" in msg, msg
  assert str(tmp_path / "wd" / "checkpoints") in msg
  assert "newest complete checkpoint is step 3" in msg
  # Stopped at the failing save itself (foreground), or at the first step
  # after its background write ended (by the next save's, step 9, at the latest).
  stop = re.search(r"stopped at step (\d+);", msg)
  assert stop and (7 <= int(stop[1]) <= 9 if where == "background"
                   else int(stop[1]) == 6), msg
  assert max(seen) >= 6, (seen, msg)
  names = os.listdir(os.path.join(wd, "checkpoints"))
  assert not [n for n in names if "tmp" in n], names
  assert ckpt_lib.Checkpointer(wd).latest_step() == 3


def test_a_save_writes_while_the_next_steps_run(tmp_path, monkeypatch):
  """The background write of step 3 overlaps steps 4, 5, ...: here it can
  only finish once step 4 is logged (a loop that waited for it after the
  next step would wait out the 60 s), and both saves are kept."""
  step_4_logged, waited_out = threading.Event(), []

  class WriteUntilStep4:
    def result(self, timeout=None):
      del timeout
      waited_out.append(not step_4_logged.wait(60))

  orig = ocp.PyTreeCheckpointHandler.async_save

  async def slow_first_save(self, *args, **kwargs):
    futures = list(await orig(self, *args, **kwargs) or [])
    return futures + ([WriteUntilStep4()] if not waited_out else [])

  monkeypatch.setattr(ocp.PyTreeCheckpointHandler, "async_save",
                      slow_first_save)

  def on_log(step, _):
    if step == 4:
      step_4_logged.set()

  wd = str(tmp_path / "wd")
  c = config(6)
  c.train.profile_steps = 0   # a profile window waits for the write by design
  trainer_lib.train_loop(c, wd, on_log=on_log)
  assert waited_out[:1] == [False]
  assert ckpt_lib.Checkpointer(wd).manager.all_steps() == [3, 6]


def test_a_resume_removes_a_killed_writers_grid_temporary(tmp_path, caplog):
  """A run killed while writing a grid PNG leaves ``write_whole``'s
  temporary beside it; sampling and evaluation removed theirs at start,
  training kept its own through every resume."""
  gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                        capture_output=True, text=True, check=True)
  wd = tmp_path / "wd"
  (wd / "images").mkdir(parents=True)
  left = wd / "images" / f"samples_0000020.{int(gone.stdout)}.tmp.png"
  left.write_bytes(b"\0" * 5000)
  with caplog.at_level(logging.WARNING):
    trainer_lib.train_loop(config(3), str(wd))
  assert not left.exists()
  assert "that a run killed midway left in" in caplog.text


def test_steps_per_sec_leaves_the_saves_out(tmp_path, monkeypatch):
  """A save's foreground time is not training time, as the grids' is not:
  with each save taking 1.5 s, the interval holding one logged at most
  2 steps / 1.5 s."""
  orig = ckpt_lib.Checkpointer.save

  def slow_save(self, *args, **kwargs):
    time.sleep(1.5)
    return orig(self, *args, **kwargs)
  monkeypatch.setattr(ckpt_lib.Checkpointer, "save", slow_save)
  logs = {}
  c = config(6)
  c.train.profile_steps = 0
  trainer_lib.train_loop(c, str(tmp_path / "wd"), on_log=logs.__setitem__)
  assert logs[4]["steps_per_sec"] > 2 / 1.5, logs[4]   # save of step 3 inside


def test_a_save_into_a_read_only_folder_keeps_its_one_message(
    tmp_path, monkeypatch, caplog):
  """A checkpoint folder that became read-only (a remount, a full quota):
  removing the half-written step failed too, and that error ("delete it by
  hand", wrong: the next run removes it) replaced the save's one message
  after ten seconds of retries."""
  import errno   # pylint: disable=import-outside-toplevel
  import logging   # pylint: disable=import-outside-toplevel
  ckpt = ckpt_lib.Checkpointer(str(tmp_path))
  (tmp_path / "checkpoints" / "4.orbax-checkpoint-tmp-1").mkdir(parents=True)
  tries = []

  def read_only(self, missing_ok=False):   # pylint: disable=unused-argument
    tries.append(self)
    raise OSError(errno.EROFS, "Read-only file system", str(self))

  monkeypatch.setattr(type(ckpt.directory), "rmtree", read_only)
  with caplog.at_level(logging.WARNING):
    e = ckpt._save_failed(4, OSError(errno.EROFS, "Read-only file system"))   # pylint: disable=protected-access
  assert isinstance(e, ckpt_lib.CheckpointSaveError)
  assert "Saving checkpoint step 4" in str(e) and "read-only" in str(e).lower()
  assert len(tries) == 1
  assert "the next run in this workdir removes it" in caplog.text


def test_a_ctrl_c_that_raises_waits_for_the_save_in_flight(tmp_path,
                                                           monkeypatch, caplog):
  """A KeyboardInterrupt in the loop (a notebook's second Ctrl-C) waits for
  the save in flight before the run lets go of its workdir: a rerun at once
  removed the half-written step as an unfinished save's leftovers and began
  again from step 0."""
  class StillWriting:
    def result(self, timeout=None):
      del timeout
      time.sleep(2)

  orig = ocp.PyTreeCheckpointHandler.async_save

  async def slow_save(self, *args, **kwargs):
    return list(await orig(self, *args, **kwargs) or []) + [StillWriting()]

  monkeypatch.setattr(ocp.PyTreeCheckpointHandler, "async_save", slow_save)
  small_run.interrupt_step(monkeypatch, 5)   # step 3's write has not ended
  wd = str(tmp_path / "wd")
  c = config(6)
  c.train.profile_steps = 0   # a profile window waits for the write by design
  with caplog.at_level(logging.WARNING), pytest.raises(KeyboardInterrupt):
    trainer_lib.train_loop(c, wd)
  assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == ["3"]
  assert ("waiting for the checkpoint of step 3, still being written "
          "(Ctrl-C again stops without it)") in caplog.text


def test_a_ctrl_c_in_the_wait_for_a_save_leaves_it_in_flight(tmp_path):
  """A notebook's second Ctrl-C often lands while the loop waits for a save
  (a stop's own, or the previous one before the next): the save stays in
  flight, so the way out waits for it (it was marked checked before the
  wait, and nothing waited)."""
  class Manager:   # Orbax's, step 3 still being written
    waits = 0

    def is_saving_in_progress(self):
      return True

    def wait_until_finished(self):
      Manager.waits += 1
      if Manager.waits == 1:
        raise KeyboardInterrupt

  (tmp_path / "checkpoints" / "3").mkdir(parents=True)
  ckpt = ckpt_lib.Checkpointer(str(tmp_path))
  ckpt.manager.close()
  ckpt.manager, ckpt._pending = Manager(), 3   # pylint: disable=protected-access
  with pytest.raises(KeyboardInterrupt):
    ckpt.wait()
  assert ckpt.in_flight() == 3
  ckpt.wait()
  assert ckpt.in_flight() is None and Manager.waits == 2
