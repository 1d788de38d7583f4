"""``core.files``: whole-file writes (a failure leaves the old file and no
temporary) and the sweep of temporaries a killed writer left."""

import os
import subprocess
import sys

import pytest

from genvis_jax.core import files


@pytest.mark.parametrize("exc", [ValueError, KeyboardInterrupt])
def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path,
                                                                   exc):
  """A write that fails, or a Ctrl-C in it, leaves the old file as it was
  and no temporary beside it (a partial samples.npz is up to 9.8 GB)."""
  target = tmp_path / "samples.npz"
  target.write_bytes(b"old")

  def write(tmp):
    with open(tmp, "wb") as f:
      f.write(b"partial")
    raise exc("boom")
  with pytest.raises(exc):
    files.write_whole(str(target), write)
  assert os.listdir(tmp_path) == ["samples.npz"]
  assert target.read_bytes() == b"old"


def test_write_whole_creates_the_folder(tmp_path):
  """As its docstring says, the folder is made."""
  target = tmp_path / "a" / "b" / "metrics.json"
  files.write_whole(str(target), lambda tmp: open(tmp, "w").write("{}"))
  assert target.read_text() == "{}"


def _dead_pid():
  p = subprocess.Popen([sys.executable, "-c", "pass"])
  p.wait()
  return p.pid


def test_stale_json_temporaries_go_and_links_and_others_stay(tmp_path,
                                                             monkeypatch):
  """A dead writer's temporaries go (.json ones too); a link named like one
  stays, and so does one of a live process of another user (os.kill refused
  with PermissionError: alive, not gone)."""
  pid = _dead_pid()
  (tmp_path / f"metrics.{pid}.tmp.json").write_text("{")
  kept = tmp_path / "kept.npz"
  kept.write_bytes(b"data")
  os.symlink(kept, tmp_path / f"link.{pid}.tmp.npz")
  assert files.remove_stale_temporaries(str(tmp_path)) == [
      f"metrics.{pid}.tmp.json"]
  assert sorted(os.listdir(tmp_path)) == ["kept.npz", f"link.{pid}.tmp.npz"]

  def another_users(p, sig):
    raise PermissionError(1, "Operation not permitted")
  (tmp_path / "samples.4001.tmp.npz").write_bytes(b"x")
  monkeypatch.setattr(os, "kill", another_users)
  assert files.remove_stale_temporaries(str(tmp_path)) == []
  assert (tmp_path / "samples.4001.tmp.npz").exists()
