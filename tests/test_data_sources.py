"""Data sources: image folders, small splits, token-file records; each bad
input names its fix (TFDS: ``test_tfds_source.py``)."""

import logging
import os
import re

import numpy as np
import pytest
from PIL import Image

from configs import base
from genvis_jax import data
from genvis_jax import errors
from genvis_jax.data import sources
from tests import data_common as dc


# --- image folder ------------------------------------------------------------

def _write_folder(root):
  """b/ blue (3 PNG), a/ red (2 JPEG + 1 corrupt + 1 ignored .txt)."""
  rng = np.random.default_rng(0)
  for i in range(3):
    size = (40 + 7 * i, 36)
    Image.new("RGB", size, (0, 0, 255)).save(root / "b" / f"{i}.png")
  for i in range(2):
    Image.new("RGB", (50, 40 + i), (255, 0, 0)).save(root / "a" / f"{i}.JPEG")
  (root / "a" / "broken.jpg").write_bytes(rng.bytes(300))
  (root / "a" / "notes.txt").write_text("not an image")


def test_image_folder_decodes_labels_sorted_and_skips_corrupt(tmp_path):
  root = tmp_path / "imgs"
  (root / "a").mkdir(parents=True)
  (root / "b").mkdir()
  _write_folder(root)
  c = dc.data_config(source="image_folder", path=str(root), image_size=16)
  it, info = data.create_dataset(c, split="train", global_batch_size=5, seed=0,
                                 train=False, process_index=0, process_count=1)
  assert info.num_examples == 6 and info.class_names == ("a", "b")
  b = next(it)                     # 6 records, one unreadable -> one batch of 5
  assert b["image"].shape == (5, 16, 16, 3)
  assert sorted(b["label"].tolist()) == [0, 0, 1, 1, 1]
  red = b["image"][b["label"] == 0].mean((0, 1, 2))
  blue = b["image"][b["label"] == 1].mean((0, 1, 2))
  assert red[0] > 0.9 and red[2] < 0.1 and blue[2] > 0.9 and blue[0] < 0.1
  assert info.num_skipped == 1
  with pytest.raises(StopIteration):
    next(it)
  # The count is part of the iterator state (restored with a checkpoint).
  it2, info2 = data.create_dataset(c, split="train", global_batch_size=5,
                                   seed=0, train=False, process_index=0,
                                   process_count=1)
  it2.set_state(it.get_state())
  assert info2.num_skipped == 1


def test_image_folder_with_no_readable_file_raises_instead_of_spinning(tmp_path):
  root = tmp_path / "bad"
  for cls in ("a", "b"):
    (root / cls).mkdir(parents=True)
    for i in range(3):
      (root / cls / f"{i}.jpg").write_bytes(b"not a jpeg")
  c = dc.data_config(source="image_folder", path=str(root), image_size=16)
  it, _ = data.create_dataset(c, split="train", global_batch_size=2, seed=0,
                              train=True, process_index=0, process_count=1)
  with pytest.raises(data.DataNotFoundError, match="No readable image in"):
    next(it)


def test_one_pass_with_workers_keeps_the_order_past_unreadable_files(
    tmp_path):
  """Evaluation's first images with worker processes: a worker that dropped
  an unreadable file's marker itself ran ahead of the others, so the first
  batch was images 4 and 1 where 1 and 3 were due."""
  root = tmp_path / "imgs"
  (root / "a").mkdir(parents=True)
  for i in range(8):
    path = root / "a" / f"{i}.png"
    if i in (0, 2):
      path.write_bytes(b"not a png")
    else:
      Image.new("RGB", (16, 16), (30 * i, 0, 0)).save(path)

  def order(workers):
    c = dc.data_config(source="image_folder", path=str(root), image_size=16,
                       num_workers=workers)
    it, info = data.create_dataset(c, split="train", global_batch_size=2,
                                   seed=0, train=False, process_index=0,
                                   process_count=1, drop_remainder=False)
    red = [round(float(v) * 255 / 30) for b in it for v in b["image"][:, 0, 0, 0]]
    it.close()
    return red, info.num_skipped

  assert order(0) == order(2) == ([1, 3, 4, 5, 6, 7], 2)


def test_a_crop_an_image_cannot_give_names_the_file(tmp_path, caplog):
  """torchvision's Resize + RandomCrop to a 2:1 crop cannot cut a squarish
  image (torchvision raises too). Training skips it like an unreadable file,
  named and counted: raised, it stopped a long run at whatever step first
  drew it, and every resume again."""
  root = tmp_path / "wide"
  (root / "a").mkdir(parents=True)
  Image.new("RGB", (80, 36), (0, 0, 255)).save(root / "a" / "wide.png")
  Image.new("RGB", (50, 40), (255, 0, 0)).save(root / "a" / "square.png")
  c = dc.data_config(source="image_folder", path=str(root), image_size=16,
                     image_width=32, random_crop_method="torchvision_bilinear")
  it, info = data.create_dataset(c, split="train", global_batch_size=2,
                                 seed=0, train=True, process_index=0,
                                 process_count=1)
  with caplog.at_level(logging.WARNING):
    for _ in range(3):
      assert next(it)["image"].shape == (2, 16, 32, 3)
  assert info.num_skipped == 1
  assert re.search(r"Skipping image .*square\.png \(A 50x40 image resized to "
                   r"20x16 is smaller than the 32x16 crop: every image needs "
                   r"an aspect ratio \(width / height\) of at least 2\. Use "
                   r"the 'adm'", caplog.text), caplog.text


@pytest.mark.parametrize("workers", [0, 2])
def test_a_crop_most_images_cannot_give_stops_the_run(tmp_path, caplog,
                                                      workers):
  """Square images with a 2:1 crop (a misconfigured run): all skipped, the
  shard read twice and a warning per file before an error that named PIL.
  Now a ConfigError naming the crop, after a few."""
  root = tmp_path / "square"
  (root / "a").mkdir(parents=True)
  for i in range(40):
    Image.new("RGB", (40, 40), (i, 0, 0)).save(root / "a" / f"{i}.png")
  c = dc.data_config(source="image_folder", path=str(root), image_size=16,
                     image_width=32, random_crop_method="torchvision_bilinear",
                     num_workers=workers)
  it, _ = data.create_dataset(c, split="train", global_batch_size=2, seed=0,
                              train=True, process_index=0, process_count=1)
  with caplog.at_level(logging.WARNING), pytest.raises(
      errors.ConfigError, match=r"Most images of .* cannot give the training "
      r"crop: 16 of the first 16 read were skipped, e\.g\. .*\.png: A 40x40 "
      r"image resized to 16x16 is smaller than the 32x16 crop"):
    next(it)
  it.close()


def test_image_folder_missing_or_empty_raise_clear_errors(tmp_path):
  kw = dict(split="train", global_batch_size=2, seed=0, process_index=0,
            process_count=1)
  c = dc.data_config(source="image_folder", path=str(tmp_path / "nope"))
  with pytest.raises(data.DataNotFoundError, match="does not exist"):
    data.create_dataset(c, **kw)
  c.path = str(tmp_path)
  with pytest.raises(data.DataNotFoundError, match="no class sub-folders"):
    data.create_dataset(c, **kw)
  (tmp_path / "cat").mkdir()
  with pytest.raises(data.DataNotFoundError, match="no images"):
    data.create_dataset(c, **kw)
  # An empty class among full ones would shift the later classes' labels.
  for name in ("bird", "dog"):
    (tmp_path / name).mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / name / "a.png")
  with pytest.raises(data.DataNotFoundError,
                     match=r"1 class folder\(s\) without an image file: "
                           r"\['cat'\].*shifts every later class"):
    data.create_dataset(c, **kw)
  (tmp_path / "cat").rmdir()
  data.create_dataset(c, **kw)


# --- small splits, symlinks, token records -----------------------------------

def test_more_processes_than_examples_raise_data_config_error():
  """1 example on 2 processes: an empty shard raised a bare StopIteration
  from the first next() of a training iterator."""
  c = dc.data_config(num_examples=1)
  for pi in range(2):
    for train, drop in ((True, True), (False, True), (False, False)):
      if (pi, drop) == (0, False):
        continue      # keeping the remainder, process 0 holds the example
      with pytest.raises(sources.DataConfigError,
                         match=r"1 example\(s\) for 2 processes.*at most 1"):
        data.create_dataset(c, split="validation", global_batch_size=2,
                            seed=0, train=train, process_index=pi,
                            process_count=2, drop_remainder=drop)


def test_training_shard_smaller_than_a_batch_repeats_it(caplog):
  import logging  # pylint: disable=import-outside-toplevel
  caplog.set_level(logging.WARNING, logger="absl")
  c = dc.data_config(num_examples=3, random_flip=False)
  it, info = data.create_dataset(c, split="validation", global_batch_size=8,
                                 seed=0, process_index=0, process_count=1)
  assert info.num_examples_per_process == 3 and info.steps_per_epoch == 1
  assert any("fewer than one local batch of 8" in r.getMessage()
             for r in caplog.records)
  for batch in dc.take(it, 3):     # fills batches, does not spin or stop
    assert batch["image"].shape == (8, 32, 32, 3)
    assert len(set(dc.keys(batch))) == 3


def test_image_folder_follows_symlinks_once(tmp_path):
  """torchvision's ImageFolder walks with followlinks=True; a link loop or
  a second link to one folder is listed once."""
  outside = tmp_path / "outside"
  outside.mkdir()
  for i in range(2):
    Image.new("RGB", (8, 8), (0, 0, 255)).save(outside / f"{i}.png")
  root = tmp_path / "imgs"
  (root / "a").mkdir(parents=True)
  Image.new("RGB", (8, 8), (255, 0, 0)).save(root / "a" / "x.png")
  (root / "a" / "more").symlink_to(outside, target_is_directory=True)
  (root / "a" / "again").symlink_to(outside, target_is_directory=True)
  (root / "a" / "self").symlink_to(root / "a", target_is_directory=True)
  (outside / "sub").mkdir()
  (outside / "sub" / "up").symlink_to(outside, target_is_directory=True)
  (root / "b").symlink_to(outside, target_is_directory=True)   # a class link
  paths, labels = sources.list_images(str(root), ("a", "b"))
  rel = [p[len(str(root)) + 1:] for p in paths]
  assert rel == ["a/again/0.png", "a/again/1.png", "a/x.png",
                 "b/0.png", "b/1.png"], rel
  assert labels.tolist() == [0, 0, 0, 1, 1]


def _token_config(pattern):
  c = base.get_config()
  c.data.source, c.data.path = "tokens", pattern
  return c


def test_token_files_without_records_warn_once_with_the_copy_command(
    tmp_path, caplog):
  import json  # pylint: disable=import-outside-toplevel
  import logging  # pylint: disable=import-outside-toplevel
  from genvis_jax.data import token_origin, tokens  # pylint: disable=import-outside-toplevel
  caplog.set_level(logging.WARNING, logger="absl")
  files = tokens.write_token_records(str(tmp_path / "train"), [0, 1, 2, 3],
                                     np.zeros((4, 5), np.int32), num_shards=2)
  # The first file keeps its record; the second lost it (copied without).
  (tmp_path / (files[0].rsplit("/", 1)[1] + ".json")).write_text(
      json.dumps({"settings": {}, "max_label": 1}))
  pattern = str(tmp_path / "train-*.array_record")
  for _ in range(3):   # a resumed run builds its iterator up to three times
    token_origin.check_training_files(_token_config(pattern))
  warned = [r.getMessage() for r in caplog.records
            if "no readable record" in r.getMessage()]
  assert len(warned) == 1, warned
  msg = warned[0]
  assert "1 of 2 token file(s)" in msg
  assert "train-00001-of-00002.array_record.json is missing" in msg
  assert "train-00000-of-00002.array_record.json" not in msg
  assert "train-*.array_record.json" in msg and f"{tmp_path}/" in msg
  assert token_origin.copy_command("gs://b/t/x-*.array_record").startswith(
      "gcloud storage cp ")
  # Every record there: no warning.
  (tmp_path / (files[1].rsplit("/", 1)[1] + ".json")).write_text(
      json.dumps({"settings": {}, "max_label": 3}))
  caplog.clear()
  token_origin.check_training_files(_token_config(pattern))
  assert not [r for r in caplog.records if "no readable record" in r.getMessage()]


def test_token_files_of_the_same_name_in_two_folders_warn_once(
    tmp_path, caplog):
  import logging  # pylint: disable=import-outside-toplevel
  from genvis_jax.data import token_origin, tokens  # pylint: disable=import-outside-toplevel
  caplog.set_level(logging.WARNING, logger="absl")
  for folder in ("a", "b"):   # two pre-tokenize outputs under one glob
    (tmp_path / folder).mkdir()
    tokens.write_token_records(str(tmp_path / folder / "train"), [0, 1],
                               np.zeros((2, 5), np.int32), num_shards=1)
  pattern = str(tmp_path / "*" / "train-*.array_record")
  for _ in range(3):
    token_origin.check_training_files(_token_config(pattern))
  warned = [r.getMessage() for r in caplog.records
            if "same name in several folders" in r.getMessage()]
  assert len(warned) == 1, warned
  assert "train-00000-of-00001.array_record" in warned[0]


def _image(path):
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.new("RGB", (4, 4), (200, 10, 10)).save(path)


def test_an_image_folder_is_one_layout_split_or_class_folders(tmp_path,
                                                            caplog):
  """The warning told a user with class folders only to add
  ``<path>/val/<class>/``, which then trained as a class "val" (held-out
  images trained on); a class named ``train`` was read as the split,
  dropping the others; ``train/`` without ``val/`` failed evaluation with
  "classes ['train'] that the training split does not have". One layout
  per folder now, and a split without its folder reads training's."""
  resolve = lambda root, split: sources.resolve_split_dir(str(root), split)
  flat = tmp_path / "flat"
  _image(flat / "cat" / "a.png")
  with caplog.at_level("WARNING"):
    assert resolve(flat, "validation") == str(flat)
  assert ("holds class folders only: split 'validation' reads the same "
          "images as training") in caplog.text
  assert f"{flat}/train/<class_name>/ and {flat}/val/<class_name>/" in (
      caplog.text)
  _image(flat / "val" / "cat" / "held.png")      # as the old advice said
  for split in ("train", "validation"):
    with pytest.raises(sources.DataConfigError,
                       match=r"holds split folders \['val'\] beside class "
                             r"folders \['cat'\].*move the class folders "
                             r"into train/"):
      resolve(flat, split)
  voc = tmp_path / "voc"                         # a class named "train"
  for name in ("bus", "train"):
    _image(voc / name / "a.png")
  with pytest.raises(sources.DataConfigError, match=r"\['train'\] beside "
                     r"class folders \['bus'\]"):
    resolve(voc, "train")
  split = tmp_path / "split"
  for name in ("bird", "apple"):
    _image(split / "train" / name / "a.png")
  caplog.clear()
  with caplog.at_level("WARNING"):
    assert resolve(split, "validation") == str(split / "train")
  assert "has no 'val' folder: split 'validation' reads the training" in (
      caplog.text)
  c = dc.data_config(source="image_folder", path=str(split), image_size=4)
  _, info = data.create_dataset(c, split="validation", global_batch_size=1,
                                seed=0, train=False, process_index=0,
                                process_count=1)
  assert info.class_names == ("apple", "bird") and info.num_examples == 2
  _image(split / "val" / "bird" / "b.png")
  assert resolve(split, "validation") == str(split / "val")
  only_val = tmp_path / "only_val"
  _image(only_val / "val" / "cat" / "a.png")
  with pytest.raises(data.DataNotFoundError, match=r"holds split folders "
                     r"\['val'\] but none for the training split 'train'"):
    resolve(only_val, "train")


def test_an_eval_split_reads_its_own_folder_with_the_training_labels(tmp_path):
  """val/ lacks class 'a': its images are read from val/ (not train/: the
  reference statistics and rFID would score training images) and keep the
  training split's labels 1 and 2, so a model's classes mean the same in
  every split; and the listing's fingerprint follows the labels, so a class
  folder added to train/ (which shifts val's labels, not its files) counts
  as a change."""
  from genvis_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  for split, classes in (("train", "abc"), ("val", "bc")):
    for c in classes:
      _image(tmp_path / split / c / f"{split}_{c}.png")
  c = dc.data_config(source="image_folder", path=str(tmp_path), image_size=4)
  src, n, names = pipeline.make_source(c, "validation")
  assert names == ("a", "b", "c") and n == 3
  assert [os.path.relpath(p, tmp_path) for p in src.paths] == [
      "val/b/val_b.png", "val/c/val_c.png"]
  assert src.labels.tolist() == [1, 2]
  val = str(tmp_path / "val")
  one = sources.fingerprint(sources.ImageFolderSource(val, ("b", "c")))
  two = sources.fingerprint(sources.ImageFolderSource(val, ("a", "b", "c")))
  assert one["count"] == two["count"] == 2 and one != two


def test_an_image_folder_lists_what_it_leaves_out(tmp_path, caplog,
                                                  monkeypatch):
  """macOS zips leave ``__MACOSX/`` (a class before) and ``._*`` files; a
  file without an image suffix is left out with a warning, not silently;
  a sub-folder that cannot be listed stops the run (``os.walk`` skipped it);
  a file name that is not UTF-8 fingerprints (it raised
  ``UnicodeEncodeError`` in pre-tokenizing and multi-process training)."""
  root = tmp_path / "imgs"
  _image(root / "cat" / "a.png")
  _image(root / "dog" / "b.png")
  _image(root / "__MACOSX" / "cat" / "._a.png")
  (root / "cat" / "._a.png").write_bytes(b"AppleDouble")
  (root / "cat" / "c.jpg_large").write_bytes(b"x")
  with open(os.fsencode(root / "dog") + b"/caf\xe9.png", "wb") as f:
    Image.new("RGB", (4, 4)).save(f, format="PNG")
  assert sources.list_classes(str(root)) == ("cat", "dog")
  with caplog.at_level("WARNING"):
    src = sources.ImageFolderSource(str(root))
  assert [os.path.basename(p) for p in src.paths] == [
      "a.png", "b.png", "caf\udce9.png"]
  assert "1 file(s) without an image suffix are not listed, e.g. " in (
      caplog.text) and "c.jpg_large" in caplog.text
  assert len(sources.fingerprint(src)["files_sha256"]) == 64
  real_walk = os.walk

  def walk(top, **kw):
    kw["onerror"](PermissionError(13, "Permission denied", str(top) + "/x"))
    return real_walk(top, **kw)
  monkeypatch.setattr(sources.os, "walk", walk)
  with pytest.raises(data.DataNotFoundError, match=r"cannot list .*cat/x "
                     r"\(PermissionError: Permission denied\); its images "
                     r"would be left out"):
    sources.ImageFolderSource(str(root))


def test_every_source_has_its_words():
  """Messages name sources in words (``modes.check_overrides``)."""
  from genvis_jax.data import sources   # pylint: disable=import-outside-toplevel
  assert set(sources.SOURCE_WORDS) == set(sources.SOURCES)
  assert set(sources.ONE_SOURCE_KEYS) <= set(sources.IMAGE_SOURCES)
