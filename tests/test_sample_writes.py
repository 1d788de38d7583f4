"""Where sampling's files go and what it leaves: a ``gs://`` workdir holds
the parts, samples and metrics; two processes writing one file; the
temporary files and transfer folders a writer killed mid-write left
(no model runs)."""

import json
import os
import subprocess
import sys
import tempfile
import textwrap

import numpy as np
import pytest

from genvis_jax.sample import driver
from tests import sample_common as sc


def test_a_gs_workdir_holds_the_parts_samples_and_metrics(
    fake_gcs, tmp_path, monkeypatch):
  """On a TPU VM the workdir is a ``gs://`` URL: the parts, their settings,
  ``samples.npz`` / ``.png`` and the evaluation's report go to the bucket
  (they went to a local folder named ``gs:``), and a second run resumes
  from the bucket's parts (no model: the sampler is a stand-in)."""
  from genvis_jax.evaluate import npz, report
  config, drawn = sc.stand_in_sampler(monkeypatch, num_samples=12)
  local = tmp_path / "cwd"
  local.mkdir()
  monkeypatch.chdir(local)
  out = driver.sample_and_save(config, "gs://bucket/run")
  assert out["npz"] == "gs://bucket/run/samples.npz"
  bucket = fake_gcs / "bucket" / "run"
  assert sorted(os.listdir(bucket)) == ["sample_parts", "samples.npz",
                                        "samples.png"]
  assert sorted(os.listdir(bucket / "sample_parts")) == [
      "000000000.npz", "000000008.npz", "settings.json"]
  with np.load(bucket / "samples.npz") as d:
    labels = d["labels"]
    assert d["arr_0"].shape == (12, 4, 6, 3) and labels.shape == (12,)
    np.testing.assert_array_equal(d["arr_0"][:, 0, 0, 0], labels)
  drawn.clear()
  driver.sample_and_save(config, "gs://bucket/run")   # nothing left to draw
  assert not drawn
  images = npz.open_images(out["npz"], setting="config.evaluate.samples")
  assert [len(b) for b in images.batches(5)] == [5, 5, 2]
  report.write("gs://bucket/run/eval", {"fid": 1.5}, "FID 1.5")
  assert json.loads((bucket / "eval" / "metrics.json").read_text()) == {
      "fid": 1.5}
  assert not os.listdir(local)      # nothing under the working directory


def test_two_processes_writing_one_file_do_not_share_its_temporary_file(
    tmp_path):
  """Two sample (or evaluate) runs finishing together in one workdir: each
  writes its own temporary file, and the last rename wins whole."""
  code = textwrap.dedent("""
      import sys, time
      from genvis_jax.core import files
      def write(tmp):
        with open(tmp, "w") as f:
          f.write(sys.argv[2] * 1000)
          f.flush()
          time.sleep(1.0)      # the other process writes meanwhile
      files.write_whole(sys.argv[1], write)
      """)
  target = str(tmp_path / "samples.png")
  runs = [subprocess.Popen([sys.executable, "-c", code, target, c],
                           stderr=subprocess.PIPE, text=True) for c in "ab"]
  for r in runs:
    assert r.wait(timeout=60) == 0, r.stderr.read()
  with open(target) as f:
    assert f.read() in ("a" * 1000, "b" * 1000)
  assert os.listdir(tmp_path) == ["samples.png"]


def test_a_writer_killed_mid_write_leaves_nothing_for_long(tmp_path,
                                                          monkeypatch):
  """A process killed inside ``write_whole`` (an OOM kill, a preemption)
  leaves its temporary file, 9.8 GB for a 50k samples.npz, one more per
  crash: the next sampling run removes those of writers no longer
  running, not a live one's or a file of another name."""
  from genvis_jax.core import files
  code = textwrap.dedent("""
      import os, signal, sys
      from genvis_jax.core import files
      def write(tmp):
        open(tmp, "wb").write(b"x" * 1000)
        os.kill(os.getpid(), signal.SIGKILL)
      files.write_whole(sys.argv[1], write)
      """)
  wd = tmp_path / "wd"
  for target in (wd / "samples.npz", wd / "sample_parts" / "000000000.npz"):
    target.parent.mkdir(parents=True, exist_ok=True)
    r = subprocess.run([sys.executable, "-c", code, str(target)])
    assert r.returncode == -9
  left = sorted(str(p.relative_to(wd)) for p in wd.rglob("*.tmp.*"))
  assert len(left) == 2, left
  live = wd / f"grid.{os.getpid()}.tmp.png"     # this process's: writing
  live.write_bytes(b"y")
  (wd / "notes.99999999.tmp.txt.keep").write_text("a user's")
  config, drawn = sc.stand_in_sampler(monkeypatch, num_samples=8)
  driver.sample_and_save(config, str(wd))
  assert drawn == [0]
  assert sorted(str(p.relative_to(wd)) for p in wd.rglob("*.tmp.*")) == [
      live.name, "notes.99999999.tmp.txt.keep"]
  assert files.remove_stale_temporaries(str(wd)) == []
  # Named otherwise than write_whole names its files, a folder, a number no
  # pid can be: a user's, left alone (one crashed the run).
  for name in ("backup.20240501.tmp", "export.123456789012345678901.tmp.npz",
               "notes.4000.tmp.txt"):
    (wd / name).write_text("a user's")
  (wd / "scratch.4001.tmp.npz").mkdir()
  assert files.remove_stale_temporaries(str(wd)) == []
  # A gs:// write's temporary folder in TMPDIR (a full copy of the file).
  tmp = tmp_path / "tmp"
  tmp.mkdir()
  monkeypatch.setenv("TMPDIR", str(tmp))
  monkeypatch.setattr(tempfile, "tempdir", None)
  r = subprocess.run([sys.executable, "-c", code.replace(
      "files.write_whole(sys.argv[1], write)",
      "files.write_whole('gs://bucket/samples.npz', write)")])
  assert r.returncode == -9 and len(os.listdir(tmp)) == 1
  killed = os.listdir(tmp)   # before this process's own (its pid's digits
  mine = f"genvis_jax_upload_{os.getpid()}_x"   # may be in the killed one's)
  (tmp / mine).mkdir()
  assert files.remove_stale_transfers() == killed
  assert os.listdir(tmp) == [mine]


def test_a_full_disk_stops_with_the_fix_and_keeps_what_was_made(
    tmp_path, monkeypatch):
  """ENOSPC writing a part, joining the parts or writing an evaluation's
  metrics.json: one UserError naming the file and the fix (the parts kept;
  the evaluation's numbers logged and printed first), where they ended in
  chained OSError tracebacks and the evaluation's numbers were lost."""
  import errno
  from genvis_jax import errors
  from genvis_jax.core import files
  from genvis_jax.evaluate import report
  from genvis_jax.sample import images as images_lib
  config, drawn = sc.stand_in_sampler(monkeypatch, num_samples=24)
  wd = str(tmp_path / "wd")
  full = OSError(errno.ENOSPC, "No space left on device")
  write_whole = files.write_whole

  def fills_at_part_8(path, write):
    if path.endswith("000000008.npz"):
      raise full
    return write_whole(path, write)
  monkeypatch.setattr(files, "write_whole", fills_at_part_8)
  with pytest.raises(errors.UserError,
                     match=r"Writing the part of images 8..15 in .*sample_parts "
                           r"failed \(.*No space left.*\); the parts written "
                           r"before it are kept there.*run the same command"):
    driver.sample_and_save(config, wd)
  assert os.path.exists(os.path.join(wd, "sample_parts", "000000000.npz"))

  monkeypatch.setattr(files, "write_whole", write_whole)
  def no_room(*args, **kwargs):
    raise full
  monkeypatch.setattr(images_lib, "save_npz_parts", no_room)
  with pytest.raises(errors.UserError,
                     match=r"Joining the sample parts into .*samples.npz "
                           r"failed .*every part is kept .*drawing nothing"):
    driver.sample_and_save(config, wd)
  assert sorted(os.listdir(os.path.join(wd, "sample_parts"))) == [
      "000000000.npz", "000000008.npz", "000000016.npz", "settings.json"]
  monkeypatch.undo()

  # Any writer through multihost.write_on_process_0 (reference.npz after a
  # pass over the split) names the file and the fix.
  from genvis_jax.evaluate import adm_reference
  def fills(*_, **__):
    raise full
  monkeypatch.setattr(adm_reference.np, "savez", fills)
  with pytest.raises(errors.OutputWriteError,
                     match=r"Writing .*ref.npz failed \(.*No space left.*\)\. "
                           r"Free space"):
    adm_reference.save_reference(str(tmp_path / "ref.npz"), mu=np.zeros(2),
                                 sigma=np.eye(2), mu_s=np.zeros(2),
                                 sigma_s=np.eye(2))
  monkeypatch.undo()
  monkeypatch.setattr(report.multihost, "write_on_process_0", no_room)
  with pytest.raises(errors.UserError,
                     match=r"metrics.json could not be written .*Its numbers: "
                           r"FID 1.23"):
    report.write(str(tmp_path / "eval"), {"fid": 1.23}, "FID 1.23")
