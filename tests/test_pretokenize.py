"""--config.mode=pretokenize: its settings checks and refusals, shards over
processes, chunked encoding (the files it writes and reuses:
tests/test_token_output.py)."""

import os

import jax.numpy as jnp
import numpy as np
import pytest

from genvis_jax import data
from genvis_jax import errors as errors_lib
from genvis_jax.data import pretokenize, pretokenize_checks, token_output
from genvis_jax.models.layers import images as images_lib
from tests.data_common import data_config


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
  pretokenize_checks.check_images_in_data(config)
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
    pretokenize_checks.check_images_in_data(config)
  pretokenize_checks.check_images_in_data(pc.load_config(
      "vq_ds16.py:runlocal", **flags, **{"pretokenize.data.image_size": 64}))


def test_a_tokenizer_config_names_both_data_sections_that_differ():
  """The README's "the tokenizer config pre-tokenizes with itself too" with
  FAR's flags (--config.pretokenize.data.path) alone: the message said
  config.data was "the generator's training input" and to pass the (empty)
  config.data path as config.pretokenize.data's."""
  from tests import pipeline_common as pc  # pylint: disable=import-outside-toplevel
  flags = {"mode": "pretokenize", "pretokenize.data.source": "image_folder",
           "pretokenize.data.path": "/data/imgs"}
  with pytest.raises(errors_lib.ConfigError, match=r"^config.data \(the "
                     r"tokenizer's training images: source 'tfds', path ''\) "
                     r"and config.pretokenize.data \(the images pre-tokenizing "
                     r"encodes: source 'image_folder', path '/data/imgs'\) "
                     r"differ: pass the same --config.data.source"):
    pretokenize_checks.check_images_in_data(pc.load_config("fqgan_dual_ds16.py",
                                                    **flags))
  pretokenize_checks.check_images_in_data(pc.load_config(
      "fqgan_dual_ds16.py", **flags, **{"data.source": "image_folder",
                                        "data.path": "/data/imgs"}))


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
  pretokenize_checks.check_tokens_fit({"seq_len": 64}, encode, 32)
  pretokenize_checks.check_tokens_fit({"grid": 8}, encode, 32)          # FAR
  pretokenize_checks.check_tokens_fit({}, encode, 64)   # no generator: nothing to fit
  with pytest.raises(errors_lib.ConfigError,
                     match=r"image_size=64 gives 256 tokens per image .* reads "
                           r"64: pass --config.pretokenize.data.image_size=32, "
                           r"or --config.model.seq_len=256\.$"):
    pretokenize_checks.check_tokens_fit({"seq_len": 64}, encode, 64)
  with pytest.raises(errors_lib.ConfigError, match=r"reads 50: pass "
                     r"--config.model.seq_len=64\.$"):   # no size gives 50
    pretokenize_checks.check_tokens_fit({"seq_len": 50}, encode, 32)
  # A size the tokenizer cannot encode, whatever the generator (a demo's
  # pre-tokenizing stage has no generator in its config.model).
  with pytest.raises(errors_lib.ConfigError, match=r"image_size=30 does not "
                     r"fit the tokenizer .* is not divisible by the "
                     r"downsampling factor 4; .*\(config.pretokenize.data."
                     r"image_size\)\.$"):
    pretokenize_checks.check_tokens_fit({}, lambda x: images_lib.check_images(
        x, factor=4), 30)
  # The paper config's own tokenizer on its abstract weights (nothing read):
  # 256 px MaskGIT codes fit RAR's 256 tokens, 128 px ones do not.
  from configs import rar_b
  config = rar_b.get_config()
  encode = pretokenize.abstract_encoder(config.tokenizer)
  pretokenize_checks.check_tokens_fit(config.model, encode, 256)
  with pytest.raises(errors_lib.ConfigError, match=r"image_size=128 gives 64 tokens"):
    pretokenize_checks.check_tokens_fit(config.model, encode, 128,
                                 pretokenize.tokenizer_size(config.tokenizer))
  with pytest.raises(errors_lib.ConfigError, match=r"^config.pretokenize.data."
                     r"image_size=120 does not fit the tokenizer \(config."
                     r"tokenizer.model\): Average-pool downsampling needs even"):
    pretokenize_checks.check_tokens_fit(config.model, encode, 120)
  # FQGAN's tokenizer takes one size (its adapters' tables): named as the
  # pre-tokenizing setting (was the model's error: "set model.image_size",
  # a key FAR's config.model lacks).
  from configs import far_b
  config = far_b.get_config("dual")
  size = pretokenize.tokenizer_size(config.tokenizer)
  assert size == 256
  with pytest.raises(errors_lib.ConfigError, match=r"^config.pretokenize.data."
                     r"image_size=192, but the tokenizer \(config.tokenizer."
                     r"model\) takes 256x256 images: pass --config.pretokenize."
                     r"data.image_size=256\.$"):
    pretokenize_checks.check_tokens_fit(config.model, pretokenize.abstract_encoder(
        config.tokenizer), 192, size)
  # ... and at its one size, codes of another grid than FAR reads: the fix
  # is the generator's grid (another image size would be refused above).
  config.tokenizer.model.image_size = 128
  with pytest.raises(errors_lib.ConfigError, match=r"image_size=128 gives 64 "
                     r"tokens .* reads 256: pass --config.model.grid=8\.$"):
    pretokenize_checks.check_tokens_fit(config.model, pretokenize.abstract_encoder(
        config.tokenizer), 128, pretokenize.tokenizer_size(config.tokenizer))


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
  # 10, just past the classes (a label equal to the count overflows too).
  batch = {"image": np.zeros((2, 8, 8, 3), np.float32), "label": np.array([3, 10])}
  info = types.SimpleNamespace(num_examples_per_process=2, num_skipped=0)
  monkeypatch.setattr(pretokenize, "image_batches", lambda *_: (iter([batch]), info))
  encode = lambda x: jnp.zeros((x.shape[0], 4), jnp.int32)
  path = str(tmp_path / "train-00000-of-00001.array_record")
  with pytest.raises(data.sources.DataConfigError,
                     match=r"holds label 10, not below its num_classes=10.*at "
                           r"least 11; nothing was written"):
    pretokenize._write_shard(ml_collections.ConfigDict({"pretokenize": p}),   # pylint: disable=protected-access
                             path, "x", {}, encode, (0.0, 1.0))
  assert not list(tmp_path.iterdir())


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
  pretokenize_checks.check_images_in_data(config)
  for key, value, pattern in (
      ("split", "validation", r"^config.pretokenize.data.split='validation' "
       r"is not the split encoded: .*--config.pretokenize.split=validation"),
      ("random_flip", True, r"^config.pretokenize.data.random_flip=True: "
       r"pre-tokenizing encodes centre crops"),
      ("random_crop", True, r"random_crop=True.*Leave it False")):
    bad = rar_b.get_config("runlocal")
    bad.pretokenize.data[key] = value
    with pytest.raises(errors_lib.ConfigError, match=pattern):
      pretokenize_checks.check_images_in_data(bad)
  # Another split encoded, labels numbered by the training split's folders.
  config.pretokenize.split = "validation"
  pretokenize_checks.check_images_in_data(config)
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
    pretokenize_checks.warn_other_trained_size("converted", data_32)
    assert not caplog.records
    pretokenize_checks.warn_other_trained_size(
        "run", ml_collections.ConfigDict(dict(image_size=64, image_width=64)))
    assert not caplog.records
    pretokenize_checks.warn_other_trained_size("run", data_32)
  # A width alone that differs is named as such.
  recorded["wide"] = ({"data": {"image_size": 32, "image_width": 64}},
                      "trained")
  pretokenize_checks.warn_other_trained_size("wide", data_32)
  assert "set --config.pretokenize.data.image_width=64 to encode" in (
      caplog.records[-1].getMessage())
  assert caplog.records[0].getMessage() == (
      "The tokenizer at run trained on 64x64 images, and pre-tokenizing "
      "encodes 32x32 ones (config.pretokenize.data.image_size / image_width):"
      " set --config.pretokenize.data.image_size=64 to encode at its training"
      " size, unless the other size is what you mean.")
