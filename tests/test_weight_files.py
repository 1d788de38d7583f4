"""Truncated or damaged weight files: one clear UserError naming path, format, size.

The intact files are the torch-written fixtures in tests/fixtures/io (see
test_convert_io.py) and an ``np.savez`` archive; each test cuts a copy short.
"""

import os
import re
import shutil

import numpy as np
import pytest
from etils import epath

from genvis_jax.convert import io as cio
from genvis_jax.errors import UserError

IO = os.path.join(os.path.dirname(__file__), "fixtures", "io")


def _cut(src, dst, n):
  dst.write_bytes(open(src, "rb").read()[:n])
  return str(dst)


def _error(path) -> str:
  with pytest.raises(UserError) as err:
    cio.load_state_dict(path)
  msg = str(err.value)
  assert path in msg and "truncated" in msg, msg
  return msg


@pytest.mark.parametrize("name,cut", [("weights.bin", 3000), ("weights.pt", 1000)])
def test_truncated_torch_zip(tmp_path, name, cut):
  path = _cut(os.path.join(IO, "nested.pt"), tmp_path / name, cut)
  msg = _error(path)
  # torch.save puts sizes only in data descriptors and the central directory
  # (at the end): the full size is unknown, so the size seen is reported.
  assert "torch.save zip" in msg and f"{cut} bytes" in msg


def test_truncated_npz_states_the_size_its_entries_need(tmp_path):
  full = tmp_path / "full.npz"
  np.savez(full, a=np.arange(1000, dtype=np.float32), b=np.ones((30, 40)))
  path = _cut(full, tmp_path / "cut.npz", 3000)
  msg = _error(path)
  # The cut falls inside member a.npy: it ends at its local header (30 bytes
  # + name + extra) + data, per the zip format (APPNOTE 4.3.7).
  import zipfile  # pylint: disable=import-outside-toplevel
  with zipfile.ZipFile(full) as zf:
    info = zf.getinfo("a.npy")
  with open(full, "rb") as f:
    f.seek(info.header_offset + 26)
    name_len, extra_len = np.frombuffer(f.read(4), "<u2")
  end = info.header_offset + 30 + int(name_len) + int(extra_len) + info.compress_size
  assert end > 3000
  assert ".npz" in msg and f"3000 of at least {end} bytes" in msg, msg


def test_truncated_legacy_pth(tmp_path):
  src = os.path.join(IO, "legacy.pth")
  full = os.path.getsize(src)
  # Cut inside the raw storages, after the pickles that state their sizes.
  msg = _error(_cut(src, tmp_path / "vgg.pth", full - 10))
  assert "legacy torch.save" in msg and f"{full - 10} of {full} bytes" in msg
  # Cut inside the pickle: the full size is unknown.
  msg = _error(_cut(src, tmp_path / "early.pth", 200))
  assert "legacy torch.save" in msg and "200 bytes" in msg


def test_truncated_safetensors(tmp_path):
  src = os.path.join(IO, "weights.safetensors")
  full = os.path.getsize(src)
  msg = _error(_cut(src, tmp_path / "w.safetensors", full - 58))
  assert ".safetensors" in msg and f"{full - 58} of {full} bytes" in msg
  msg = _error(_cut(src, tmp_path / "h.safetensors", 20))   # inside the header
  assert re.search(r"20 of at least \d+ bytes", msg), msg


def test_damaged_and_unknown_files_are_user_errors(tmp_path):
  bad = tmp_path / "x.bin"
  bad.write_bytes(b"hello world, not weights")
  with pytest.raises(UserError, match="unknown checkpoint format.*24 bytes"):
    cio.load_state_dict(str(bad))
  # An intact zip member table but a storage overwritten by garbage pickle.
  dst = tmp_path / "d.pt"
  shutil.copy(os.path.join(IO, "nested.pt"), dst)
  raw = bytearray(dst.read_bytes())
  raw[100:140] = b"\xff" * 40            # inside data.pkl
  dst.write_bytes(bytes(raw))
  with pytest.raises(UserError) as err:
    cio.load_state_dict(str(dst))
  assert str(dst) in str(err.value) and "torch.save zip" in str(err.value)


def test_convert_cli_reports_a_truncated_file_without_traceback(tmp_path):
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  full = os.path.getsize(os.path.join(IO, "legacy.pth"))
  path = _cut(os.path.join(IO, "legacy.pth"), tmp_path / "vgg.pth", full - 10)
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  env.pop("GENVIS_VERBOSE", None)
  cmd = [sys.executable, "-m", "genvis_jax.convert", "--kind=lpips",
         f"--src={path}", f"--dst={tmp_path / 'out.npz'}"]
  run = subprocess.run(cmd, cwd=repo, capture_output=True, text=True,
                       timeout=120, env=env)
  assert run.returncode != 0
  assert "Traceback" not in run.stderr, run.stderr
  assert f"Error: {path}: legacy torch.save" in run.stderr, run.stderr
  assert f"{full - 10} of {full} bytes" in run.stderr
  assert not (tmp_path / "out.npz").exists()


def test_weight_files_and_converter_outputs_on_gcs(fake_gcs, tmp_path,
                                                   monkeypatch):
  """Teacher / LPIPS ``.npz`` files are written to and read from ``gs://``
  (they were "not found"); a non-empty ``gs://`` --dst is refused without
  --overwrite. Nothing lands in a local ``gs:`` folder."""
  # pylint: disable=import-outside-toplevel
  import os
  from genvis_jax import convert as convert_lib
  from genvis_jax.convert import clip_vision
  from genvis_jax.errors import OutputExistsError
  monkeypatch.chdir(tmp_path)
  params = {"block": {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3)}}
  clip_vision.save_teacher_params("gs://bucket/weights/teacher.npz", params)
  assert (fake_gcs / "bucket" / "weights" / "teacher.npz").is_file()
  got = clip_vision.load_teacher_params("gs://bucket/weights/teacher.npz")
  np.testing.assert_array_equal(got["block"]["kernel"],
                                params["block"]["kernel"])
  with pytest.raises(OutputExistsError, match="exists and is not empty"):
    convert_lib._check_dst("gs://bucket/weights", overwrite=False)  # pylint: disable=protected-access
  convert_lib._check_dst("gs://bucket/new", overwrite=False)  # pylint: disable=protected-access
  # A missing or damaged gs:// file is named by its own path, not the copy.
  from genvis_jax.errors import (CheckpointFileError,  # pylint: disable=import-outside-toplevel
                                 CheckpointFileNotFoundError)
  with pytest.raises(CheckpointFileNotFoundError,
                     match=r"^Weights file gs://bucket/no\.pth not found"):
    convert_lib.load_sources("gs://bucket/no.pth")
  (fake_gcs / "bucket" / "bad.pth").write_bytes(b"not a checkpoint")
  with pytest.raises(CheckpointFileError, match=r"^gs://bucket/bad\.pth: "
                     r"unknown checkpoint format"):
    convert_lib.load_sources("gs://bucket/bad.pth")
  assert not os.path.exists(tmp_path / "gs:")


def test_steps_of_a_gs_workdir_are_listed(fake_gcs, monkeypatch):
  """Orbax asks the bucket whether it has hierarchical namespaces before it
  lists or deletes a gs:// run's steps, through the GCS client it does not
  declare: without it every run on a bucket stopped at start-up with
  "cannot import name 'storage' from 'google.cloud'"."""
  from google.cloud import storage
  from genvis_jax.core import checkpoint_files
  asked = []

  class Client:
    def get_bucket(self, name):
      asked.append(name)
      return type("Bucket", (), {"hierarchical_namespace_enabled": False})()
  monkeypatch.setattr(storage, "Client", Client)
  for step in ("3", "6", "9"):   # 9: not finished (no commit file)
    folder = fake_gcs / "bucket" / "run" / "checkpoints" / step
    folder.mkdir(parents=True)
    if step != "9":
      (folder / "commit_success.txt").write_text("done")
  assert checkpoint_files.saved_steps(
      epath.Path("gs://bucket/run/checkpoints")) == {3, 6}
  assert asked == ["bucket"]
