"""One run per workdir (``core.workdir_lock``, ``modes.LOCKED``): a second
training, sampling, evaluation, pre-tokenizing or demo run is refused before
it reads or writes anything, naming the first; what it leaves behind."""

import os
import re

import pytest

from configs import demo, rar_b
from genvis_jax import modes
from genvis_jax.core import workdir_lock
from genvis_jax.train import trainer as trainer_lib
from tests import small_run


def test_a_second_run_in_a_busy_workdir_is_refused(tmp_path):
  """One training run per workdir: another one's lock (held here as a second
  command would find it) refuses the run before it builds or writes
  anything, naming the holder; once released, the run trains."""
  wd = str(tmp_path / "wd")
  os.makedirs(wd)
  with workdir_lock.hold(wd):
    with pytest.raises(workdir_lock.WorkdirBusyError,
                       match=rf"{re.escape(wd)} is in use by another run \(training "
                             rf"run: process {os.getpid()} on .*, since 20.*\)\. "
                             "Wait for it to end"):
      trainer_lib.train_loop(small_run.config(2), wd)
  assert os.listdir(wd) == [workdir_lock.LOCK_NAME]
  state = trainer_lib.train_loop(small_run.config(2), wd)
  assert int(state.step) == 2
  with workdir_lock.hold(wd):   # released when the run ended
    pass


@pytest.mark.parametrize("mode", ["sample", "evaluate", "pretokenize",
                                  "pretokenize_output", "demo"])
def test_other_modes_refuse_a_busy_workdir_before_reading_anything(
    tmp_path, monkeypatch, mode):
  """A sampling, evaluation, pre-tokenizing or demo run finds the lock first
  (here a training run's; the inputs named do not exist) and keeps it while
  it runs: a second run is refused, not run twice. Pre-tokenizing holds the
  folder its token files go to (``<workdir>/tokens``, or that of
  ``pretokenize.output`` even from another workdir). A refused run leaves
  the lock file it found and the folder holding it (it may have made that
  folder too: two runs started at once); a new workdir of its own that
  holds nothing is removed."""
  wd = str(tmp_path / "wd")
  held = {"pretokenize": os.path.join(wd, "tokens"),
          "pretokenize_output": str(tmp_path / "other" / "tokens")}.get(mode, wd)
  if mode == "demo":
    c = demo.get_config()
  else:
    c = rar_b.get_config("runlocal")
    c.mode, c.init_from = mode.split("_")[0], str(tmp_path / "absent")
    c.tokenizer.checkpoint = str(tmp_path / "absent")
  if mode == "pretokenize_output":
    c.pretokenize.output = os.path.join(held, "train")
  os.makedirs(held)
  made = lambda w: (os.makedirs(w, exist_ok=True), w)[1]   # "made" by the run
  with workdir_lock.hold(held):
    with monkeypatch.context() as m:
      m.setattr(modes, "check_workdir", made)
      with pytest.raises(workdir_lock.WorkdirBusyError,
                         match=r"in use by another run \(training run: "):
        modes.run(c, wd)
    assert os.path.exists(os.path.join(held, workdir_lock.LOCK_NAME))
    assert os.path.exists(wd) == (held == wd or mode == "pretokenize")
  if mode != "demo":
    with pytest.raises(Exception) as e:   # free: the missing input is named
      modes.run(c, wd)
    assert not isinstance(e.value, workdir_lock.WorkdirBusyError)


def test_a_failed_pretokenize_leaves_no_folder_it_made_for_its_tokens(
    tmp_path):
  """The token folder made to hold the lock goes with the failed run, as
  its workdir does (the tokenizer named does not exist)."""
  c = rar_b.get_config("runlocal")
  c.mode, c.tokenizer.checkpoint = "pretokenize", str(tmp_path / "absent")
  c.pretokenize.output = str(tmp_path / "tok" / "sub" / "train")
  with pytest.raises(Exception, match="absent"):
    modes.run(c, str(tmp_path / "wd"))
  assert sorted(os.listdir(tmp_path)) == []


def test_pretokenizing_leaves_no_lock_among_its_token_files(tmp_path,
                                                            monkeypatch):
  """The token folder is copied on as a whole (``gcloud storage cp
  tokens/*``): the lock that refuses a second run writing the same files
  while one runs is removed when the run ends."""
  c = rar_b.get_config("runlocal")
  c.mode = "pretokenize"
  wd = str(tmp_path / "wd")
  tokens = os.path.join(wd, "tokens")
  shard = "train-00000-of-00001.array_record"

  def pretokenize(config, workdir):
    assert workdir_lock.LOCK_NAME in os.listdir(tokens)
    with pytest.raises(workdir_lock.WorkdirBusyError,
                       match=r"in use by another run \(pre-tokenizing run: "):
      modes.run(config, str(tmp_path / "other_wd"))   # same output folder
    open(os.path.join(tokens, shard), "w").close()

  monkeypatch.setattr(modes, "resolve", lambda mode: pretokenize)
  c.pretokenize.output = os.path.join(tokens, "train")
  modes.run(c, wd)
  assert os.listdir(tokens) == [shard]
  modes.run(c, wd)   # the next run takes the lock anew, and removes it too
  assert os.listdir(tokens) == [shard]


def test_a_lock_removed_as_it_is_taken_is_not_held_twice(tmp_path,
                                                         monkeypatch):
  """A run that opens the lock file just before its holder removes it
  (``remove=True``) and locks the removed file must not run beside a third
  run that locked the new file at that path: it looks again and is refused."""
  import fcntl
  real_open, third = os.open, []

  def open_then_replaced(path, flags, mode=0o777):
    fd = real_open(path, flags, mode)
    if not third:   # the holder removes it; a third run locks a new one
      os.remove(path)
      third.append(real_open(path, os.O_RDWR | os.O_CREAT, 0o644))
      fcntl.flock(third[0], fcntl.LOCK_EX)
      os.write(third[0], b"pre-tokenizing run: the third")
    return fd

  with monkeypatch.context() as m:
    m.setattr(workdir_lock.os, "open", open_then_replaced)
    with pytest.raises(workdir_lock.WorkdirBusyError, match="the third"):
      with workdir_lock.hold(str(tmp_path), remove=True):
        pass
  os.close(third[0])
  with workdir_lock.hold(str(tmp_path), remove=True):
    assert os.listdir(tmp_path) == [workdir_lock.LOCK_NAME]
  assert not os.listdir(tmp_path)


def _bucket(tmp_path, monkeypatch):
  """gs:// workdirs whose lease TensorStore writes under tmp_path/gcs."""
  from genvis_jax.core import files
  root = tmp_path / "gcs"
  root.mkdir()
  monkeypatch.setattr(files, "kvstore_url", lambda folder: "file://" + str(
      root / str(folder).removeprefix("gs://").rstrip("/")) + "/")
  return root


def test_an_object_store_workdir_is_held_by_a_lease(tmp_path, monkeypatch,
                                                    caplog):
  """gs:// has no file locks: two runs on one bucket workdir wrote each
  other's steps (one run's work silently lost). Process 0 creates a lease
  object only where none is, renews it and deletes it at the end; a fresh
  one refuses a second run naming its holder, a stale one (its run killed)
  is taken over with a warning."""
  import json
  import logging
  import time
  from genvis_jax.core import lease as lease_lib
  root = _bucket(tmp_path, monkeypatch)
  wd, lease = "gs://bucket/runs/rar_xl", root / "bucket" / "runs" / "rar_xl"
  lease = lease / lease_lib.LEASE_NAME
  with workdir_lock.hold(wd, "training run"):
    assert json.loads(lease.read_text())["pid"] == os.getpid()
    with pytest.raises(workdir_lock.WorkdirBusyError,
                       match=rf"{wd} is in use by another run \(training run: "
                             rf"process {os.getpid()} on .*, since 20.*, "
                             rf"renewed \d+ s ago; {wd}/\.genvis_lease\)\. "
                             r"Wait for it to end.* delete "):
      with workdir_lock.hold(wd, "sampling run"):
        pass
  assert not lease.exists()        # deleted at the end
  # A run killed while holding it: taken over once it was not renewed for
  # STALE_S.
  lease.write_text(json.dumps({"what": "training run", "pid": 1, "host": "w-3",
                               "renewed": time.time() - 60}))
  with pytest.raises(workdir_lock.WorkdirBusyError, match=r"process 1 on w-3"):
    with workdir_lock.hold(wd):
      pass
  # Its process killed on this host (no unwinding deleted the lease, as a
  # local lock is released): taken over at once, not after STALE_S.
  import socket
  import subprocess
  import sys
  gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                        capture_output=True, text=True, check=True)
  lease.write_text(json.dumps({"what": "evaluation run", "pid": int(gone.stdout),
                               "host": socket.gethostname(),
                               "renewed": time.time()}))
  with caplog.at_level(logging.WARNING):
    with workdir_lock.hold(wd):
      pass
  assert "no longer runs on this host" in caplog.text
  lease.write_text(json.dumps({"what": "training run", "pid": 1, "host": "w-3",
                               "renewed": time.time() - lease_lib.STALE_S - 1}))
  with caplog.at_level(logging.WARNING):
    with workdir_lock.hold(wd):
      assert json.loads(lease.read_text())["pid"] == os.getpid()
  assert "Taking over" in caplog.text and "process 1 on w-3" in caplog.text
  assert not lease.exists()


def test_a_lease_is_renewed_and_a_lost_one_is_left_alone(tmp_path, monkeypatch,
                                                         caplog):
  import json
  import logging
  import time
  from genvis_jax.core import files
  from genvis_jax.core import lease as lease_lib
  root = _bucket(tmp_path, monkeypatch)
  path = root / "b" / "wd" / lease_lib.LEASE_NAME
  held = lease_lib.Lease("gs://b/wd", "training run", heartbeat_s=0.05)
  held.take()
  first = json.loads(path.read_text())["renewed"]
  deadline = time.time() + 10
  while json.loads(path.read_text())["renewed"] == first:
    assert time.time() < deadline, "not renewed"
    time.sleep(0.05)
  # Another run took it over (this one was taken to be gone): this one says
  # so, stops renewing, and does not delete the other's lease.
  with caplog.at_level(logging.ERROR):
    # Written through TensorStore, as a run writes it: its file store takes
    # a lock around each write, where a plain file write could land between
    # a renewal's check and its rename and be overwritten (a loaded machine
    # did that; a bucket's conditional writes are atomic).
    other = lease_lib.ts.KvStore.open(files.kvstore_url("gs://b/wd")).result()
    other.write(lease_lib.LEASE_NAME, json.dumps(
        {"what": "other", "renewed": time.time()}).encode()).result()
    held._thread.join(timeout=30)   # pylint: disable=protected-access
    assert not held._thread.is_alive(), "the lost lease was not noticed"  # pylint: disable=protected-access
    held.release()
  assert "was taken over by another run" in caplog.text
  assert json.loads(path.read_text())["what"] == "other"
  # Two runs creating it at the same moment: the second's write finds the
  # first's lease and is refused.
  path.unlink()
  racing = lease_lib.Lease("gs://b/wd", "sampling run")
  read = racing._kv.read   # pylint: disable=protected-access

  class Kv:
    def read(self, key):
      found = read(key).result()
      path.write_text(json.dumps({"what": "first", "renewed": time.time()}))
      return type("Done", (), {"result": lambda self: found})()
    write = racing._kv.write   # pylint: disable=protected-access
  racing._kv = Kv()   # pylint: disable=protected-access
  with pytest.raises(lease_lib.LeaseBusyError,
                     match=r"taken by another run at the same moment"):
    racing.take()


def test_the_lock_file_names_only_its_holder(tmp_path):
  """A longer earlier holder's text does not trail the new one (the "in
  use by" message reads the file)."""
  lock = tmp_path / workdir_lock.LOCK_NAME
  lock.write_text("x" * 300 + "\nold holder line\n")
  with workdir_lock.hold(str(tmp_path), "sampling run"):
    text = lock.read_text()
  assert text.count("\n") == 1 and text.startswith("sampling run: process ")
