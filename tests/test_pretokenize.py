"""--config.mode=pretokenize: which existing files it reuses, its settings
checks and refusals, shards over processes, chunked encoding."""

import os

import jax.numpy as jnp
import numpy as np
import pytest

from genvis_jax import data
from genvis_jax import errors as errors_lib
from genvis_jax import models
from genvis_jax.data import pretokenize, token_output
from tests.data_common import data_config


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


def test_pretokenize_refuses_a_remote_output_before_encoding(tmp_path):
  """The token writer writes local files: a gs:// output (or workdir, the
  default's folder) is refused before any data or weights are read."""
  from configs import rar_b  # pylint: disable=import-outside-toplevel
  config = rar_b.get_config("runlocal")
  config.mode = "pretokenize"
  config.tokenizer.checkpoint = str(tmp_path / "no_such_tokenizer")
  for workdir, output in (("gs://b/runs/x", ""), (str(tmp_path), "gs://b/t")):
    config.pretokenize.output = output
    with pytest.raises(errors_lib.ConfigError,
                       match=r"writes local files.*--config.pretokenize.output"):
      pretokenize.pretokenize(config, workdir)
  assert not os.listdir(tmp_path)


def test_pretokenize_names_its_own_data_settings(tmp_path, caplog):
  """Pre-tokenizing reads config.pretokenize.data: its errors name that
  section, and images set in config.data (the training input) instead are
  warned about (they encoded the demo shapes without a word)."""
  from configs import rar_b  # pylint: disable=import-outside-toplevel
  config = rar_b.get_config("runlocal")
  config.mode = "pretokenize"
  config.tokenizer.checkpoint = str(tmp_path / "no_such_tokenizer")
  config.pretokenize.data.source = "image_folder"
  config.pretokenize.data.path = str(tmp_path / "nope")
  with pytest.raises(data.DataNotFoundError,
                     match=r"Image folder '.*nope' does not exist "
                           r"\(config.pretokenize.data.path\)"):
    pretokenize.pretokenize(config, str(tmp_path / "wd"))
  config.pretokenize.data.path = ""
  with pytest.raises(data.DataNotFoundError,
                     match=r"^config.pretokenize.data.path is empty"):
    pretokenize.pretokenize(config, str(tmp_path / "wd"))
  pretokenize.check_images_in_data(config)
  config.pretokenize.data.source = "demo"
  config.data.source, config.data.path = "image_folder", "/my/images"
  with pytest.raises(errors_lib.ConfigError,
                     match=r"^config.data names images \(source 'image_folder', "
                           r"path '/my/images'\), but pre-tokenizing reads "
                           r"config.pretokenize.data \(source 'demo'.*"
                           r"--config.pretokenize.data.path=/my/images"):
    pretokenize.pretokenize(config, str(tmp_path / "wd"))


def test_a_tokenizer_config_encodes_at_its_own_image_size():
  """A tokenizer's config pre-tokenizing its own images: the copy in
  config.pretokenize.data kept the size the file set, so a tokenizer
  trained with --config.data.image_size=64 encoded 32 px images (8x8 codes,
  not 16x16) without a word, and a generator trained on them."""
  from tests import pipeline_common as pc  # pylint: disable=import-outside-toplevel
  flags = {"mode": "pretokenize", "data.image_size": 64,
           "model.image_size": 64}
  config = pc.load_config("vq_ds16.py:runlocal", **flags)
  with pytest.raises(errors_lib.ConfigError,
                     match=r"^config.data.image_size=64 but pre-tokenizing "
                           r"encodes config.pretokenize.data at image_size="
                           r"32: pass --config.pretokenize.data.image_size=64"):
    pretokenize.check_images_in_data(config)
  pretokenize.check_images_in_data(pc.load_config(
      "vq_ds16.py:runlocal", **flags, **{"pretokenize.data.image_size": 64}))


def test_pretokenize_stops_when_another_process_refuses_its_shard(tmp_path,
                                                                  monkeypatch):
  """Processes agree on reuse before the (collective) tokenizer load: one
  refusing its shard, or failing to read its data, stops the others instead
  of leaving them waiting; processes started with other settings stop."""
  from configs import rar_b
  from genvis_jax.core import multihost
  from genvis_jax.data import pretokenize
  c = rar_b.get_config("runlocal")
  c.tokenizer.checkpoint = str(tmp_path / "tok")   # never read: stops before
  wd = str(tmp_path / "wd")
  sent = []
  with monkeypatch.context() as m:
    m.setattr(multihost, "gather_ints",
              lambda v: sent.append(v) or np.array([v, -1]))
    with pytest.raises(multihost.OtherProcessError,
                       match=r"Processes \[1\] failed to start their shards"):
      pretokenize.pretokenize(c, wd)

    def no_data(*args):
      raise data.DataNotFoundError("no images here")
    m.setattr(token_output, "output_settings", no_data)
    with pytest.raises(data.DataNotFoundError, match="no images here"):
      pretokenize.pretokenize(c, wd)
    assert sent == [1, -1]          # ... after telling the others it failed
  # Process 1 computed other settings (flags, data, weights) than process 0.
  with monkeypatch.context() as m:
    m.setattr(multihost.jax, "process_count", lambda: 2)
    m.setattr(multihost, "broadcast_strings", lambda strings, size=0: strings)
    m.setattr(multihost, "gather_ints", lambda v: np.array([v, v ^ 1]))
    with pytest.raises(multihost.OtherProcessError,
                       match=r"Processes \[1\] run with other pre-tokenizing "
                             r"settings"):
      pretokenize.pretokenize(c, wd)


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


def test_pretokenize_class_error_names_its_own_setting():
  import ml_collections
  p = ml_collections.ConfigDict(dict(
      data=data_config(source="demo", num_classes=5, num_examples=20),
      split="train", batch_size=4, ten_crop=False))
  with pytest.raises(data.sources.DataConfigError,
                     match=r"config.pretokenize.data.num_classes is 5.*"
                           r"Set --config.pretokenize.data.num_classes=10; "
                           r"the generator trained on these tokens needs the "
                           r"same: --config.data.num_classes=10 "
                           r"--config.model.num_classes=10\."):
    pretokenize.image_batches(p, (0.0, 1.0), process_index=0, process_count=1)
  # A batch of 0 names the key it came from, not the training batch.
  zero = ml_collections.ConfigDict(dict(
      data=data_config(source="demo", num_examples=20), split="train",
      batch_size=0, ten_crop=False))
  with pytest.raises(data.sources.DataConfigError,
                     match=r"change config.pretokenize.batch_size"):
    pretokenize.image_batches(zero, (0.0, 1.0), process_index=0,
                              process_count=1)
  from genvis_jax.evaluate import reference   # pylint: disable=import-outside-toplevel
  with pytest.raises(data.sources.DataConfigError,
                     match=r"change config.evaluate.batch_size\.$"):
    reference.dataset_images(zero.data, "train", 0)
  # A tokenizer's config (config.data) names no flag it lacks
  # (--config.pretokenize.data... was refused as an unknown key there).
  from genvis_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  with pytest.raises(data.sources.DataConfigError) as e:
    pipeline._check_classes(1000, p.data, "config.data")   # pylint: disable=protected-access
  assert "Set --config.data.num_classes=1000; the jobs" in str(e.value)
  assert "--config.pretokenize" not in str(e.value)


def test_pretokenize_refuses_a_bad_crop_before_judging_existing_files(tmp_path):
  """An unknown crop is the error, not "the file was written with other
  settings" (whose advice, overwrite, would only lead to it)."""
  from configs import demo
  from genvis_jax.data import pretokenize
  c = demo.pretokenize_config()
  c.pretokenize.data.center_crop = "bogus"
  with pytest.raises(errors_lib.ConfigError,
                     match=r"'bogus' \(config.pretokenize.data.center_crop\)"):
    pretokenize.pretokenize(c, str(tmp_path))


def test_encode_in_chunks_calls_one_shape_in_order():
  """Ten-crop batches are encoded in calls of exactly ``chunk`` images (the
  last padded and cut), in order: one compiled shape, bounded memory."""
  shapes = []
  def encode(x):
    shapes.append(x.shape)
    return x[:, 0] * 2
  images = np.arange(23 * 3, dtype=np.float32).reshape(23, 3)
  out = pretokenize.encode_in_chunks(encode, images, 8)
  np.testing.assert_array_equal(out, images[:, 0] * 2)
  assert shapes == [(8, 3)] * 3


def test_pretokenize_refuses_images_of_another_token_count():
  """Images whose codes are not as many as the generator reads are refused
  before encoding (training stopped at its first batch), naming the size
  that fits."""
  encode = lambda x: jnp.zeros((x.shape[0], (x.shape[1] // 4) ** 2), jnp.int32)
  pretokenize.check_tokens_fit({"seq_len": 64}, encode, 32)
  pretokenize.check_tokens_fit({"grid": 8}, encode, 32)          # FAR
  pretokenize.check_tokens_fit({}, encode, 64)   # no generator: nothing to fit
  with pytest.raises(errors_lib.ConfigError,
                     match=r"image_size=64 gives 256 tokens per image .* reads "
                           r"64: pass --config.pretokenize.data.image_size=32"):
    pretokenize.check_tokens_fit({"seq_len": 64}, encode, 64)
  with pytest.raises(errors_lib.ConfigError, match=r"reads 50: pass the image "
                     r"size this tokenizer encodes"):
    pretokenize.check_tokens_fit({"seq_len": 50}, encode, 32)
  # The paper config's own tokenizer on its abstract weights (nothing read):
  # 256 px MaskGIT codes fit RAR's 256 tokens, 128 px ones do not.
  from configs import rar_b
  config = rar_b.get_config()
  encode = pretokenize.abstract_encoder(config.tokenizer)
  pretokenize.check_tokens_fit(config.model, encode, 256)
  with pytest.raises(errors_lib.ConfigError, match=r"image_size=128 gives 64 tokens"):
    pretokenize.check_tokens_fit(config.model, encode, 128)


def test_a_split_slice_names_files_a_glob_can_find():
  """``train[:50%]`` in the file names made the printed training pattern a
  glob character class that matched nothing."""
  import ml_collections
  c = ml_collections.ConfigDict({"pretokenize": {"output": "", "split": "train[:50%]"}})
  assert pretokenize.output_prefix(c, "/w") == "/w/tokens/train__50__"


def test_labels_beyond_num_classes_stop_pretokenizing(tmp_path, monkeypatch):
  """A source that states no class count (TFDS integer labels) wrote tokens
  of label 5019 for num_classes=10; only the generator's run refused them."""
  import types
  import ml_collections
  p = ml_collections.ConfigDict(dict(
      data=data_config(source="demo", num_classes=10, image_size=8),
      split="train", batch_size=2, ten_crop=False, device_batch=2))
  batch = {"image": np.zeros((2, 8, 8, 3), np.float32), "label": np.array([3, 12])}
  info = types.SimpleNamespace(num_examples_per_process=2, num_skipped=0)
  monkeypatch.setattr(pretokenize, "image_batches", lambda *_: (iter([batch]), info))
  encode = lambda x: jnp.zeros((x.shape[0], 4), jnp.int32)
  path = str(tmp_path / "train-00000-of-00001.array_record")
  with pytest.raises(data.sources.DataConfigError,
                     match=r"holds label 12, not below its num_classes=10.*at "
                           r"least 13; nothing was written"):
    pretokenize._write_shard(ml_collections.ConfigDict({"pretokenize": p}),   # pylint: disable=protected-access
                             path, "x", {}, encode, (0.0, 1.0))
  assert not list(tmp_path.iterdir())


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


def test_data_settings_pretokenizing_does_not_apply_are_refused_or_unrecorded(
    tmp_path):
  """``--config.pretokenize.data.split=validation`` encoded the train split,
  and ``random_flip=True`` / ``random_crop=True`` did nothing: refused, each
  naming what to set. Keys it does not read are not recorded, so a file
  written with another value of one (or before they were left out) is
  reused, not encoded again into the same codes."""
  import json
  from configs import rar_b  # pylint: disable=import-outside-toplevel
  config = rar_b.get_config("runlocal")
  pretokenize.check_images_in_data(config)
  for key, value, pattern in (
      ("split", "validation", r"^config.pretokenize.data.split='validation' "
       r"is not the split encoded: .*--config.pretokenize.split=validation"),
      ("random_flip", True, r"^config.pretokenize.data.random_flip=True: "
       r"pre-tokenizing encodes centre crops"),
      ("random_crop", True, r"random_crop=True.*Leave it False")):
    bad = rar_b.get_config("runlocal")
    bad.pretokenize.data[key] = value
    with pytest.raises(errors_lib.ConfigError, match=pattern):
      pretokenize.check_images_in_data(bad)
  # Another split encoded, labels numbered by the training split's folders.
  config.pretokenize.split = "validation"
  pretokenize.check_images_in_data(config)
  # An older record holding the unread keys, at other values, still matches.
  config.tokenizer.checkpoint = "/ckpt/tok"
  settings = token_output.output_settings(config, "/ckpt/tok")
  assert not set(settings["data"]) & {"random_flip", "crop_min_frac",
                                       "eval_split"}
  path = data.write_token_records(str(tmp_path / "t"), np.arange(4, dtype=np.int32),
                                  np.zeros((4, 8), np.int32))[0]
  old = {**settings, "data": {**settings["data"], "random_flip": True,
                              "crop_min_frac": 0.8, "eval_split": "val"}}
  with open(path + ".json", "w") as f:
    json.dump({"settings": old, "records": 4, "images": 4}, f)
  assert token_output.existing_output(path, settings, overwrite=False)


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


def test_encoding_at_another_size_than_the_tokenizer_trained_at_is_warned(
    monkeypatch, caplog):
  """A tokenizer trained at 64 px read by a generator config that encodes
  32 px images wrote codes of another size without a word (the generator
  checks only the token count)."""
  import logging   # pylint: disable=import-outside-toplevel
  import ml_collections   # pylint: disable=import-outside-toplevel
  from genvis_jax.core import weights   # pylint: disable=import-outside-toplevel
  recorded = {"run": ({"data": {"image_size": 64, "image_width": 0}},
                      "trained"),
              "converted": ({"data": {"image_size": 64}}, "converted")}
  monkeypatch.setattr(weights, "recorded_config", recorded.__getitem__)
  data_32 = ml_collections.ConfigDict(dict(image_size=32, image_width=0))
  with caplog.at_level(logging.WARNING):
    pretokenize.warn_other_trained_size("converted", data_32)
    assert not caplog.records
    pretokenize.warn_other_trained_size(
        "run", ml_collections.ConfigDict(dict(image_size=64, image_width=64)))
    assert not caplog.records
    pretokenize.warn_other_trained_size("run", data_32)
  # A width alone that differs is named as such.
  recorded["wide"] = ({"data": {"image_size": 32, "image_width": 64}},
                      "trained")
  pretokenize.warn_other_trained_size("wide", data_32)
  assert "set --config.pretokenize.data.image_width=64 to encode" in (
      caplog.records[-1].getMessage())
  assert caplog.records[0].getMessage() == (
      "The tokenizer at run trained on 64x64 images, and pre-tokenizing "
      "encodes 32x32 ones (config.pretokenize.data.image_size / image_width):"
      " set --config.pretokenize.data.image_size=64 to encode at its training"
      " size, unless the other size is what you mean.")
