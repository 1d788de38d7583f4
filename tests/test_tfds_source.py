"""The TFDS source (``data/tfds_source.py``) and ``prepare_tfds``: a data
set not prepared or unknown, ArrayRecord read as TFDS reads it, splits and
slices, grey / alpha images, unlabelled sets; each bad input names its fix."""

import io
import re

import ml_collections
import numpy as np
import pytest
from PIL import Image

from genvis_jax import data
from genvis_jax.data import pipeline
from genvis_jax.data import sources
from genvis_jax.data import tfds_source
from tests import data_common as dc


def test_tfds_not_prepared_raises_how_to_build(tmp_path):
  c = dc.data_config(source="tfds", name="imagenet2012", path=str(tmp_path))
  with pytest.raises(data.DataNotFoundError) as e:
    data.create_dataset(c, split="train", global_batch_size=2, seed=0,
                        process_index=0, process_count=1)
  msg = str(e.value)
  assert "imagenet2012" in msg and str(tmp_path) in msg
  assert ("python -m genvis_jax.data.prepare_tfds --name=imagenet2012 "
          f"--data_dir={tmp_path}") in msg
  assert not list(tmp_path.iterdir())       # nothing downloaded or prepared


def test_a_name_tfds_does_not_know_is_not_told_to_tfds_build(tmp_path):
  """'shapes' (the runlocal demo data's name) under source=tfds: `tfds build
  shapes` fails too, so the message says the name must be a TFDS data set."""
  c = dc.data_config(source="tfds", name="shapes", path=str(tmp_path))
  with pytest.raises(data.DataNotFoundError,
                     match=r"^config.data.name='shapes' is not a TFDS data set"
                           r".*Set --config.data.name to a TFDS data set, "
                           r"e.g. imagenet2012.*`python -m genvis_jax.data."
                           r"prepare_tfds --name=imagenet2012 "
                     ) as e:
    data.create_dataset(c, split="train", global_batch_size=2, seed=0,
                        process_index=0, process_count=1)
  assert "--name=shapes" not in str(e.value)
  assert not list(tmp_path.iterdir())


def test_tfds_source_reads_a_prepared_array_record_data_set(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")

  class TinyGenvisImages(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(shape=(None, None, 3)),
          "label": tfds.features.ClassLabel(num_classes=3)}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples(6),
              "validation": self._generate_examples(2)}

    def _generate_examples(self, n):
      for i in range(n):
        yield i, {"image": np.full((20 + i, 24, 3), 40 * i, np.uint8),
                  "label": i % 3}

  TinyGenvisImages(data_dir=str(tmp_path), file_format="array_record"
                   ).download_and_prepare()
  c = dc.data_config(source="tfds", name="tiny_genvis_images", path=str(tmp_path),
                   image_size=16)
  it, info = data.create_dataset(c, split="train", global_batch_size=3, seed=0,
                                 train=False, process_index=0, process_count=1)
  batches = list(it)
  assert info.num_examples == 6 and info.num_classes == 3 and len(batches) == 2
  images = np.concatenate([b["image"] for b in batches])
  labels = np.concatenate([b["label"] for b in batches])
  assert images.shape == (6, 16, 16, 3)
  # Each record's grey level 40 * i identifies it: labels must be i % 3.
  i = np.rint(images[:, 0, 0, 0] * 255 / 40).astype(int)
  assert sorted(i.tolist()) == list(range(6))
  np.testing.assert_array_equal(labels, i % 3)


def _fake_tfds(images):
  src = object.__new__(tfds_source.TfdsSource)
  src.name, src.split, src.labelled = "fake", "train", True
  src._label_limit = None   # pylint: disable=protected-access
  src._source = [{"image": x, "label": i} for i, x in enumerate(images)]  # pylint: disable=protected-access
  return src


def test_tfds_grey_and_alpha_images_become_rgb_as_pil_converts():
  rng = np.random.default_rng(0)
  shapes = [(5, 6), (5, 6, 1), (5, 6, 2), (5, 6, 3), (5, 6, 4)]
  arrays = [rng.integers(0, 256, s, dtype=np.uint8) for s in shapes]
  src = _fake_tfds(arrays)
  modes = ["L", "L", "LA", "RGB", "RGBA"]
  for i, (x, mode) in enumerate(zip(arrays, modes)):
    got = src[i]["image"]
    pil = Image.fromarray(x.reshape(5, 6) if mode == "L" else x, mode)
    want = np.asarray(pil.convert("RGB"))   # alpha dropped, not composited
    assert got.shape == (5, 6, 3) and got.dtype == np.uint8, mode
    np.testing.assert_array_equal(got, want, err_msg=mode)
  with pytest.raises(sources.DataConfigError, match="shape \\(5, 6, 5\\)"):
    _fake_tfds([np.zeros((5, 6, 5), np.uint8)])[0]
  # 16-bit images: their high byte, as image folders' 16-bit files (they
  # crashed in the resize, or, already at size, reached the model x 257).
  wide = rng.integers(0, 65536, (5, 6, 3), dtype=np.uint16)
  got = _fake_tfds([wide])[0]["image"]
  assert got.dtype == np.uint8
  np.testing.assert_array_equal(got, wide >> 8)
  with pytest.raises(sources.DataConfigError, match="dtype float32; uint8"):
    _fake_tfds([np.zeros((5, 6, 3), np.float32)])[0]


def test_prepare_tfds_writes_what_the_tfds_source_reads(tmp_path):
  """The README's command for ImageNet, `tfds build`, fails at import
  (Apache Beam); ``prepare_tfds`` builds a data set in ArrayRecord format
  that ``source=tfds`` then reads, here a tiny builder of this test's."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  from genvis_jax.data import prepare_tfds  # pylint: disable=import-outside-toplevel

  class GenvisUnlabelled(tfds.core.GeneratorBasedBuilder):   # pylint: disable=unused-variable
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return self.dataset_info_from_configs(features=tfds.features.FeaturesDict(
          {"image": tfds.features.Image(shape=(8, 8, 3))}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      for i in range(2):
        yield i, {"image": np.zeros((8, 8, 3), np.uint8)}

  class GenvisTinyImages(tfds.core.GeneratorBasedBuilder):   # pylint: disable=unused-variable
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return self.dataset_info_from_configs(features=tfds.features.FeaturesDict(
          {"image": tfds.features.Image(shape=(8, 8, 3)),
           "label": tfds.features.ClassLabel(num_classes=3)}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples(5)}

    def _generate_examples(self, n):
      for i in range(n):
        yield i, {"image": np.full((8, 8, 3), 40 * i, np.uint8), "label": i % 3}

  where = prepare_tfds.prepare("genvis_tiny_images", str(tmp_path))
  assert where.startswith(str(tmp_path))
  src = tfds_source.TfdsSource("genvis_tiny_images", "train", str(tmp_path))
  assert len(src) == 5 and src.num_classes == 3
  assert sorted(int(src[i]["image"][0, 0, 0]) for i in range(5)) == [0, 40, 80, 120, 160]
  # config.data.path at the data set's own folder (or its version folder):
  # the fix is the folder above, not a rebuild.
  for inner in (tmp_path / "genvis_tiny_images", tmp_path / "genvis_tiny_images" / "1.0.0"):
    with pytest.raises(data.DataNotFoundError,
                       match=rf"path='{re.escape(str(inner))}' is the folder of the data "
                             rf"set 'genvis_tiny_images' itself.*set it to "
                             rf"'{re.escape(str(tmp_path))}'"):
      tfds_source.TfdsSource("genvis_tiny_images", "train", str(inner))
  # TFDS slices of a split read as TFDS reads them.
  assert len(tfds_source.TfdsSource("genvis_tiny_images", "train[:3]", str(tmp_path))) == 3
  with pytest.raises(sources.DataConfigError, match=r"has no split 'val'"):
    tfds_source.TfdsSource("genvis_tiny_images", "val", str(tmp_path))
  # The message names the key that holds the missing split.
  cfg = ml_collections.ConfigDict(dict(source="tfds", name="genvis_tiny_images",
                                       path=str(tmp_path), split="train",
                                       eval_split="validation"))
  with pytest.raises(sources.DataConfigError,
                     match=r"no split 'validation'.*--config.data.eval_split to"):
    pipeline.make_source(cfg, "validation")
  cfg.split = "training"
  with pytest.raises(sources.DataConfigError,
                     match=r"no split 'training'.*--config.data.split to"):
    pipeline.make_source(cfg, "training")
  # Images without labels (tokenizers and references need none): class 0.
  prepare_tfds.prepare("genvis_unlabelled", str(tmp_path))
  plain = tfds_source.TfdsSource("genvis_unlabelled", "train", str(tmp_path))
  assert plain.num_classes == 1 and int(plain[1]["label"]) == 0


def _jpeg(width: int, height: int, value: int) -> io.BytesIO:
  out = io.BytesIO()
  Image.new("RGB", (width, height), (value, 0, 0)).save(out, "JPEG")
  return io.BytesIO(out.getvalue())


def test_damaged_records_and_crop_misfits_are_skipped_as_files_are(tmp_path):
  """A record whose image bytes do not decode, and a training image the 2:1
  random crop cannot cut, are skipped and counted, named by data set, split
  and index, as an image folder's files are (both stopped the run: the
  first in TFDS's decoder, the second in the crop). Labels that are not a ClassLabel are
  checked against config.data.num_classes as they are read (they reached
  the model's class embedding past its end), and a data set prepared as
  TFRecord is sent to another folder, not to the command that cannot
  change its format."""
  tfds = pytest.importorskip("tensorflow_datasets")
  from genvis_jax.data import prepare_tfds  # pylint: disable=import-outside-toplevel

  class GenvisDamaged(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(shape=(None, None, 3),
                                       encoding_format="jpeg"),
          "label": tfds.features.Scalar(dtype=np.int64)}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples()}

    def _generate_examples(self):
      images = [_jpeg(80, 36, 40 * i) for i in range(4)]
      images[1] = io.BytesIO(b"\xff\xd8\xff\xe0 not a JPEG")   # damaged
      images[2] = _jpeg(50, 40, 0)     # 20x16 at height 16: narrower than 32
      for i, image in enumerate(images):
        yield i, {"image": image, "label": 2 * i}

  GenvisDamaged(data_dir=str(tmp_path), file_format="array_record"
                ).download_and_prepare()
  c = dc.data_config(source="tfds", name="genvis_damaged", path=str(tmp_path),
                     image_size=16, image_width=32, num_classes=8,
                     random_crop_method="torchvision_bilinear")
  it, info = data.create_dataset(c, split="train", global_batch_size=2, seed=0,
                                 train=True, process_index=0, process_count=1)
  for _ in range(3):
    assert next(it)["image"].shape == (2, 16, 32, 3)
  assert info.num_skipped == 2
  # (TFDS stores the records in an order of its own.)
  skipped = it.get_state()["skipped_files"]
  assert len(set(skipped)) == 2 and all(
      re.fullmatch(r"genvis_damaged/train\[[0-3]\]", f) for f in skipped)
  it.close()
  # One pass (evaluation, references): ADM's centre crop fits the 50x40
  # image; the damaged record is skipped.
  it, info = data.create_dataset(c, split="train", global_batch_size=1, seed=0,
                                 train=False, process_index=0, process_count=1)
  assert len(list(it)) == 3 and info.num_skipped == 1
  # Saved with each input position: a split prepared again with more
  # records redraws the order on a resume (its position went on silently).
  from genvis_jax.train import resume  # pylint: disable=import-outside-toplevel
  listing = info.listing()
  assert listing == {"count": 4, "tfds": "genvis_damaged:1.0.0 train"}
  assert resume.listing_changed(listing, dict(listing), 3, "") == ""
  assert resume.listing_changed(listing, {**listing, "count": 6}, 3, "") == (
      "counts examples of another TFDS data set (genvis_damaged:1.0.0 train, "
      "4 examples then; genvis_damaged:1.0.0 train, 6 now: prepared again or "
      "another split)")
  c.num_classes = 6     # label 6 (the last image) is just past it
  it, _ = data.create_dataset(c, split="train", global_batch_size=1, seed=0,
                              train=True, process_index=0, process_count=1)
  for _ in range(4):   # read, not checked: no model's classes (a tokenizer)
    next(it)
  it.close()
  it, _ = data.create_dataset(c, split="train", global_batch_size=1, seed=0,
                              train=True, process_index=0, process_count=1,
                              check_labels=True)
  with pytest.raises(sources.DataConfigError,
                     match=r"genvis_damaged/train\[[0-3]\] has label 6, "
                           r"outside 0..5 \(config.data.num_classes=6\).*not "
                           r"a ClassLabel.*--config.data.num_classes above"):
    for _ in range(4):
      next(it)
  it.close()
  # TFDS's own default format, TFRecord.
  other = tmp_path / "tfrecord"
  GenvisDamaged(data_dir=str(other)).download_and_prepare()
  with pytest.raises(data.DataNotFoundError,
                     match=r"stored as .*TFRECORD.*one format per folder: "
                           r"prepare it into another data_dir.*--data_dir="
                           r"<another data_dir>"):
    tfds_source.TfdsSource("genvis_damaged", "train", str(other))
  with pytest.raises(ValueError, match=r"already prepared in .* as .*TFRECORD"
                     r".*Give another --data_dir"):
    prepare_tfds.prepare("genvis_damaged", str(other))
