"""The token files pre-tokenizing writes (``data.token_output``, the
writer in ``data.tokens``): which existing files it reuses by their records,
what a record holds, a full disk, a record left pending by a killed run,
stale partial shards."""

import os

import numpy as np
import pytest

from genvis_jax import data
from genvis_jax import errors as errors_lib
from genvis_jax import models
from genvis_jax.data import token_output


def test_pretokenize_reuses_only_a_readable_file_of_the_same_settings(
    tmp_path, caplog):
  import json
  from genvis_jax import errors
  from genvis_jax.data import tokens as tokens_lib
  path = data.write_token_records(str(tmp_path / "t"), np.arange(4, dtype=np.int32),
                                  np.zeros((4, 8), np.int32))[0]
  now = {"weights": "w", "examples": {"count": 4}}

  def record(settings, records=4, **more):
    rec = {"settings": settings, "records": records, "images": 4, **more}
    with open(path + ".json", "w") as f:
      json.dump(rec, f)
    return rec
  rec = record(now)
  assert token_output.existing_output(path, now, overwrite=False) == rec
  assert token_output.existing_output(path, now, overwrite=True) is None
  with pytest.raises(errors.OutputExistsError,
                     match=r"other settings \(weights: 'w' -> 'v'\)"):
    token_output.existing_output(path, {**now, "weights": "v"}, overwrite=False)
  # A record from before the split's fingerprint: reused, with a warning.
  rec = record({"weights": "w"})
  assert token_output.existing_output(path, now, overwrite=False) == rec
  assert "no fingerprint of its split" in caplog.text
  with pytest.raises(errors.OutputExistsError, match=r"weights: 'w' -> 'v'"):
    token_output.existing_output(path, {**now, "weights": "v"}, overwrite=False)
  # Records from before the precision was named: written at XLA's default,
  # reused (said: a TPU's is one bf16 pass), alone or with older gaps; a
  # named other precision, or a 16-bit encoder that rounded each op (no
  # bf16_rounding), wrote other codes: refused.
  caplog.clear()
  tf32 = {**now, "precision": "tensorfloat32"}
  for old in (now, {"weights": "w"}):
    rec = record(old)
    assert token_output.existing_output(path, tf32, overwrite=False) == rec
  assert "records no matmul precision" in caplog.text
  # A config that sets the precision wrote at it then too: no warning.
  caplog.clear()
  rec = record(now)
  fp32 = {**now, "precision": "float32"}
  assert token_output.existing_output(path, fp32, overwrite=False) == rec
  assert "matmul precision" not in caplog.text
  record({**now, "precision": "float32"})
  with pytest.raises(errors.OutputExistsError,
                     match=r"precision: 'float32' -> 'tensorfloat32'"):
    token_output.existing_output(path, tf32, overwrite=False)
  record(tf32)
  with pytest.raises(errors.OutputExistsError,
                     match=r"bf16_rounding: \(absent\) -> 'autocast'; "
                           r"bf16_rounding: this version's 16-bit models"):
    token_output.existing_output(path, {**tf32, "bf16_rounding": "autocast"},
                                 overwrite=False)
  # A record from before its config listed every tokenizer setting: the
  # ones it leaves out count at their defaults (output_settings lists all).
  listed = {**now, "tokenizer": json.loads(json.dumps(models.with_defaults(
      {"name": "maskgit_vqgan", "num_codes": 16})))}
  rec = record({**now, "tokenizer": {"name": "maskgit_vqgan", "num_codes": 16}})
  assert token_output.existing_output(path, listed, overwrite=False) == rec
  with pytest.raises(errors.OutputExistsError,
                     match=r"tokenizer.dropout: 0.0 -> 0.5"):
    token_output.existing_output(path, {**listed, "tokenizer": {
        **listed["tokenizer"], "dropout": 0.5}}, overwrite=False)
  # Damaged since it was written (or its record disagrees): not reused.
  record(now, records=5)
  with pytest.raises(errors.OutputExistsError, match="damaged since"):
    token_output.existing_output(path, now, overwrite=False)
  # The writer hashes the finished file (before renaming it into place).
  with tokens_lib.TokenWriter(str(tmp_path / "w.array_record")) as w:
    w.write(0, np.zeros(8, np.int32))
  assert w.sha256 == tokens_lib.file_sha256(w.path)
  # A changed byte the record count does not see: the recorded SHA-256 does.
  rec = record(now, sha256=tokens_lib.file_sha256(path))
  assert token_output.existing_output(path, now, overwrite=False) == rec
  with open(path, "r+b") as f:
    f.seek(100)
    byte = f.read(1)
    f.seek(100)
    f.write(bytes([byte[0] ^ 1]))
  assert tokens_lib.count_records(path) == 4
  with pytest.raises(errors.OutputExistsError,
                     match=r"4 records, SHA-256 [0-9a-f]{12}\): damaged since"):
    token_output.existing_output(path, now, overwrite=False)
  record(now)
  open(path, "r+b").truncate(1000)
  with pytest.raises(errors.OutputExistsError, match="damaged since"):
    token_output.existing_output(path, now, overwrite=False)


@pytest.mark.parametrize("fails_at", ["write", "close"])
def test_token_writer_full_disk_names_the_file_and_leaves_nothing(
    tmp_path, monkeypatch, fails_at):
  """A full disk (ArrayRecord raises RuntimeError from a write or from the
  close that flushes the last chunk) is an OutputWriteError naming the file,
  and no .partial file is left beside finished ones."""
  from genvis_jax.data import tokens as tokens_lib
  real = tokens_lib.array_record_module.ArrayRecordWriter

  class FullDisk:
    def __init__(self, path, options):
      self._w = real(path, options)

    def write(self, record):
      if fails_at == "write":
        raise RuntimeError("write() failed: No space left on device")
      self._w.write(record)

    def close(self):
      self._w.close()
      raise RuntimeError("write() failed: No space left on device; "
                         "Failed to close chunk_writer")

  monkeypatch.setattr(tokens_lib.array_record_module, "ArrayRecordWriter",
                      FullDisk)
  path = str(tmp_path / "t.array_record")
  with pytest.raises(errors_lib.OutputWriteError,
                     match=r"t\.array_record failed \(RuntimeError: write\(\) "
                           r"failed: No space left.*run the same command"):
    with tokens_lib.TokenWriter(path) as w:
      w.write(0, np.zeros(8, np.int32))
  assert os.listdir(tmp_path) == []


def test_token_records_name_the_precision_and_bf16_rounding():
  """The encoder's matmul precision and, for a 16-bit encoder, its
  rounding decide the codes: both are in a token file's record."""
  from configs import demo
  c = demo.pretokenize_config()
  c.tokenizer.checkpoint = "/ckpt/tokenizer"
  now = token_output.output_settings(c)
  assert now["precision"] == "tensorfloat32" and "bf16_rounding" not in now
  c.matmul_precision = "float32"
  c.tokenizer.dtype = "bfloat16"
  now = token_output.output_settings(c)
  assert now["precision"] == "float32" and now["bf16_rounding"] == "autocast"


def test_shards_written_before_the_remainder_was_kept_are_written_again(
    monkeypatch):
  """33 examples over 2 processes: process 0's shard now holds 17, but older
  writers gave it 16; process 1's 16 are as before."""
  settings = {"examples": {"count": 33}}
  monkeypatch.setattr(token_output.jax, "process_count", lambda: 2)
  for index, short in ((0, True), (1, False)):
    monkeypatch.setattr(token_output.jax, "process_index", lambda: index)
    assert token_output.lacks_remainder({"records": 160}, settings) == short
    assert not token_output.lacks_remainder(
        {"records": 170, "remainder_kept": True}, settings)
  monkeypatch.setattr(token_output.jax, "process_count", lambda: 1)
  assert not token_output.lacks_remainder({"records": 330}, settings)


def test_a_record_left_pending_by_a_killed_run_is_completed(tmp_path, caplog):
  """A run killed between renaming its token file into place and writing
  the record left a file the same command refused ('no record of their
  settings': the whole split encoded again). The record is written whole
  as <file>.json.partial before the rename; a rerun completes it when the
  hashes agree, and drops another file's."""
  import json
  from genvis_jax.data import tokens as tokens_lib
  path = data.write_token_records(str(tmp_path / "t"), np.arange(4, dtype=np.int32),
                                  np.zeros((4, 8), np.int32))[0]
  now = {"weights": "w", "examples": {"count": 4}}
  rec = {"settings": now, "records": 4, "images": 4,
         "sha256": tokens_lib.file_sha256(path)}
  pending = token_output.pending_record(path)
  with open(pending, "w") as f:
    json.dump(rec, f)
  assert token_output.existing_output(path, now, overwrite=False) == rec
  assert os.path.exists(path + ".json") and not os.path.exists(pending)
  assert "completed the record a run stopped before writing" in caplog.text
  # Another file's pending record (another hash) is not this file's.
  os.remove(path + ".json")
  with open(pending, "w") as f:
    json.dump({**rec, "sha256": "0" * 64}, f)
  with pytest.raises(errors_lib.OutputExistsError,
                     match="with no record of their settings"):
    token_output.existing_output(path, now, overwrite=False)
  assert not os.path.exists(pending)


def test_a_partial_shard_of_another_process_count_is_removed(tmp_path):
  """A shard killed mid-write on 2 processes, rerun on 1, stayed for good
  (nothing wrote that name again)."""
  out = str(tmp_path / "tokens" / "train")
  (tmp_path / "tokens").mkdir()
  stale = f"{out}-00001-of-00002.array_record.partial"
  ours = f"{out}-00000-of-00001.array_record.partial"   # this count's own
  for path in (stale, ours):
    open(path, "w").close()
  assert token_output.remove_stale_partials(out) == [stale]
  assert sorted(os.listdir(tmp_path / "tokens")) == [os.path.basename(ours)]
