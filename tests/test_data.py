"""Grain input pipeline: demo data, sources, transforms, sharding, checkpoints."""

import grain
import numpy as np
import pytest
from PIL import Image

from configs import base
from genvis_jax import data
from genvis_jax.data import demo, sources, transforms
from genvis_jax.errors import ConfigError
from tests import pipeline_common as pc


def _data_config(**kw):
  c = base.get_config().data
  c.image_size = 32
  c.prefetch = 2
  c.read_threads = 4
  c.update(kw)
  return c


def _take(it, n):
  return [next(it) for _ in range(n)]


def _keys(batch):
  """One hashable key per example (its pixels / tokens)."""
  x = batch["image"] if "image" in batch else batch["tokens"]
  return [row.tobytes() for row in x]


# --- demo data ---------------------------------------------------------------

def test_demo_is_deterministic_balanced_and_varied():
  a = demo.DemoSource("validation")
  # Generated once per process and shared read-only by equal sources.
  assert demo.DemoSource("validation").images is a.images
  assert not a.images.flags.writeable and not a.labels.flags.writeable
  demo._generated.cache_clear()   # pylint: disable=protected-access
  b = demo.DemoSource("validation")   # generated again: the same arrays
  assert b.images is not a.images
  np.testing.assert_array_equal(a.images, b.images)
  np.testing.assert_array_equal(a.labels, b.labels)
  assert not np.array_equal(a.images, demo.DemoSource("validation", seed=1).images)
  assert not np.array_equal(a.images[:100], demo.DemoSource("train").images[:100])
  assert a.images.shape == (1000, 32, 32, 3) and a.images.dtype == np.uint8
  assert len(demo.DemoSource("train")) == 10_000
  np.testing.assert_array_equal(np.bincount(a.labels), [100] * 10)
  rec = a[3]
  assert rec["label"].dtype == np.int32 and rec["image"].shape == (32, 32, 3)
  # Full range used, every image has structure (fg vs bg), and classes are
  # not given away by the mean colour (random colours).
  assert a.images.min() == 0 and a.images.max() == 255
  assert (a.images.reshape(1000, -1).std(axis=1) > 10).all()
  means = np.stack([a.images[a.labels == c].mean() for c in range(10)])
  assert means.std() < 12


def test_demo_shapes_have_the_geometry_of_their_class():
  images, labels = demo.demo_shapes(400, seed=3)
  x = images.astype(np.float32)
  # Row-to-row vs column-to-column change: horizontal stripes change along y.
  dy = np.abs(np.diff(x, axis=1)).mean((1, 2, 3))
  dx = np.abs(np.diff(x, axis=2)).mean((1, 2, 3))
  h = labels == demo.SHAPE_CLASSES.index("horizontal_stripes")
  v = labels == demo.SHAPE_CLASSES.index("vertical_stripes")
  assert (dy[h] > 2.5 * dx[h]).all() and (dx[v] > 2.5 * dy[v]).all()
  # Objects leave the border as background: the corners share one colour,
  # which differs from the centre colour of a circle.
  circle = labels == demo.SHAPE_CLASSES.index("circle")
  corners = x[circle][:, [0, 0, -1, -1], [0, -1, 0, -1]]        # (m, 4, 3)
  assert (corners.std(axis=1) < 20).all()
  p = demo.SHAPE_CLASSES.index("square")
  assert (np.abs(x[labels == p][:, 16, 16] - x[labels == p][:, 0, 0]).max(-1)
          > 40).mean() > 0.9


def test_demo_landscapes_are_horizontally_stationary():
  src = demo.DemoSource("validation", kind="landscapes")
  x = src.images.astype(np.float32)
  assert x.shape == (1000, 32, 64, 3)
  np.testing.assert_array_equal(np.bincount(src.labels), [200] * 5)
  col_mean = x.mean(axis=(0, 1, 3))                       # (W,)
  assert np.abs(col_mean - col_mean.mean()).max() < 3.0
  row_mean = x.mean(axis=(0, 2, 3))                       # sky vs ground differ
  assert row_mean.std() > 5 * col_mean.std()


# --- transforms --------------------------------------------------------------

def test_center_crop_matches_adm_box_halving_and_offsets():
  rng = np.random.default_rng(0)
  img = rng.integers(0, 256, (256, 384, 3), dtype=np.uint8)
  out = transforms.center_crop(img, 128)
  # 256x384 -> BOX halving (2x2 mean) -> 128x192, no resize, columns 32:160.
  box = img.reshape(128, 2, 192, 2, 3).astype(np.float32).mean((1, 3))
  assert out.shape == (128, 128, 3)
  assert np.abs(out.astype(np.float32) - box[:, 32:160]).max() <= 1.0
  # Non-square target (landscapes) and the no-op case.
  assert transforms.center_crop(img, 32, 64).shape == (32, 64, 3)
  small = img[:32, :32]
  same = transforms.center_crop(small, 32)
  assert np.shares_memory(same, small) and np.array_equal(same, small)


def test_random_crop_and_flip():
  rng = np.random.default_rng(1)
  img = rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)
  offsets = set()
  for seed in range(20):
    out = transforms.random_crop(img, 32, None, np.random.default_rng(seed))
    matches = [o for o in range(17) if np.array_equal(out, img[:, o:o + 32])]
    assert len(matches) == 1
    offsets.add(matches[0])
    again = transforms.random_crop(img, 32, None, np.random.default_rng(seed))
    np.testing.assert_array_equal(out, again)
  assert len(offsets) > 5
  # Crop fraction 0.8: the cover size varies, the output size does not.
  sizes = {transforms.random_crop(img, 32, None, np.random.default_rng(s),
                                  min_frac=0.8).shape for s in range(10)}
  assert sizes == {(32, 32, 3)}

  flip = transforms.RandomFlip()
  rec = {"image": img, "label": np.int32(0)}
  flipped = [flip.random_map(rec, np.random.default_rng(s))["image"] for s in range(200)]
  n_flipped = sum(np.array_equal(f, img[:, ::-1]) for f in flipped)
  n_same = sum(np.array_equal(f, img) for f in flipped)
  assert n_flipped + n_same == 200 and 70 < n_flipped < 130
  assert transforms.to_float(np.array([0, 255], np.uint8), (-1, 1)).tolist() == [-1, 1]


def test_torchvision_bilinear_random_crop_is_the_equivariant_recipe():
  """Resize(256) (PIL BILINEAR, long side truncated) + RandomCrop(256) at
  uniform offsets, restated in PIL; the eq paper config selects it."""
  rng = np.random.default_rng(2)
  img = rng.integers(0, 256, (375, 500, 3), dtype=np.uint8)
  resized = np.asarray(Image.fromarray(img).resize((341, 256), Image.BILINEAR))
  bicubic = np.asarray(Image.fromarray(img).resize((341, 256), Image.BICUBIC))
  crop = transforms.RandomCrop(256, method="torchvision_bilinear")
  offsets = set()
  for seed in range(12):
    out = crop.random_map({"image": img}, np.random.default_rng(seed))["image"]
    hits = [o for o in range(86) if np.array_equal(out, resized[:, o:o + 256])]
    assert len(hits) == 1 and not np.array_equal(out, bicubic[:, hits[0]:hits[0] + 256])
    offsets.add(hits[0])
  assert len(offsets) > 6
  with pytest.raises(ConfigError, match="crop_min_frac=0.8 needs the 'adm'"):
    transforms.RandomCrop(256, min_frac=0.8, method="torchvision_bilinear")
  with pytest.raises(ConfigError, match="random_crop_method"):
    transforms.RandomCrop(256, method="bilinear")
  assert pc.load_config("eq_s.py").data.random_crop_method == "torchvision_bilinear"


def _bilinear_no_antialias(img, new_h, new_w):
  """Bilinear resize with half-pixel centres, clamped at the borders and no
  antialiasing (OpenCV's ``INTER_LINEAR``), in float64: (h, w, c) ->
  (new_h, new_w, c)."""
  def taps(n_out, n_in):
    x = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
    i0 = np.floor(x).astype(int)
    return i0, np.minimum(i0 + 1, n_in - 1), (x - i0)[:, None]
  y0, y1, fy = taps(new_h, img.shape[0])
  x0, x1, fx = taps(new_w, img.shape[1])
  rows = img[y0].astype(np.float64) * (1 - fy[..., None]) + img[y1] * fy[..., None]
  return rows[:, x0] * (1 - fx) + rows[:, x1] * fx


def test_albumentations_random_crop_is_the_equivariant_tokenizer_recipe():
  """SmallestMaxSize(256) (OpenCV bilinear, not antialiased, sides rounded)
  + RandomCrop(256) at uniform offsets; the eq_tokenizer config selects it
  for training and its centre-crop twin for evaluation."""
  rng = np.random.default_rng(3)
  img = rng.integers(0, 256, (375, 500, 3), dtype=np.uint8)
  # 500 * 256 / 375 = 341.33 -> 341 columns.
  resized = transforms.albumentations_center_crop(img, 256, 341)
  ref = _bilinear_no_antialias(img, 256, 341)
  assert np.abs(resized - ref).max() <= 1.0     # OpenCV's fixed-point weights
  pil = np.asarray(Image.fromarray(img).resize((341, 256), Image.BILINEAR))
  assert np.abs(pil.astype(np.float64) - ref).max() > 20   # PIL antialiases
  crop = transforms.RandomCrop(256, method="albumentations")
  offsets = set()
  for seed in range(12):
    out = crop.random_map({"image": img}, np.random.default_rng(seed))["image"]
    hits = [o for o in range(86) if np.array_equal(out, resized[:, o:o + 256])]
    assert len(hits) == 1
    offsets.add(hits[0])
  assert len(offsets) > 6
  # Already the target's short side: no resize (albumentations' scale 1).
  same = transforms.albumentations_center_crop(img[:256], 256)
  np.testing.assert_array_equal(same, img[:256, 122:378])
  with pytest.raises(ConfigError, match="crop_min_frac=0.8 needs the 'adm'"):
    transforms.RandomCrop(256, min_frac=0.8, method="albumentations")
  d = pc.load_config("eq_tokenizer.py").data
  assert (d.random_crop_method, d.center_crop) == ("albumentations",) * 2


# --- pipeline ----------------------------------------------------------------

def test_batches_shapes_dtypes_and_ranges():
  c = _data_config()
  it, info = data.create_dataset(c, split="train", global_batch_size=16, seed=0,
                                 process_index=0, process_count=1)
  b = next(it)
  assert set(b) == {"image", "label"}
  assert b["image"].shape == (16, 32, 32, 3) and b["image"].dtype == np.float32
  assert b["label"].shape == (16,) and b["label"].dtype == np.int32
  assert 0.0 <= b["image"].min() and b["image"].max() <= 1.0
  assert info.num_classes == 10 and info.num_examples == 10_000
  assert info.steps_per_epoch == 625 and info["local_batch_size"] == 16
  assert info.num_skipped == 0

  c = _data_config(source="demo_landscapes", image_width=64)
  it, info = data.create_dataset(c, split="validation", global_batch_size=8,
                                 seed=0, train=False, process_index=0,
                                 process_count=1, value_range=(-1, 1))
  b = next(it)
  assert b["image"].shape == (8, 32, 64, 3)
  assert b["image"].min() < -0.5 and b["image"].max() <= 1.0
  assert info.num_classes == 5


def test_bad_batch_and_class_count_raise_at_creation():
  c = _data_config()
  with pytest.raises(ValueError, match="multiple of the process count 3"):
    data.create_dataset(c, split="train", global_batch_size=16, seed=0,
                        process_index=0, process_count=3)
  with pytest.raises(ValueError, match="num_classes=10"):
    data.create_dataset(_data_config(num_classes=5), split="train",
                        global_batch_size=8, seed=0, process_index=0,
                        process_count=1)
  with pytest.raises(ValueError, match="Unknown config.data.source"):
    data.create_dataset(_data_config(source="nope"), split="train",
                        global_batch_size=8, seed=0, process_index=0,
                        process_count=1)


def test_processes_read_disjoint_shards_covering_the_split():
  c = _data_config()
  seen = []
  for pi in range(2):
    it, info = data.create_dataset(c, split="validation", global_batch_size=100,
                                   seed=0, train=False, process_index=pi,
                                   process_count=2)
    assert info.steps_per_epoch == 10 and info.num_examples_per_process == 500
    keys = sum((_keys(b) for b in it), [])
    assert len(keys) == 500
    # Training: the first epoch of a process is a permutation of its shard.
    it_train, _ = data.create_dataset(
        _data_config(random_flip=False), split="validation",
        global_batch_size=100, seed=0, train=True, process_index=pi,
        process_count=2)
    assert set(sum((_keys(b) for b in _take(it_train, 10)), [])) == set(keys)
    seen.append(set(keys))
  assert not seen[0] & seen[1]
  assert len(seen[0] | seen[1]) == 1000
  # One pass keeping every example (pre-tokenizing): 100 over 3 processes
  # gives shards of 34 / 33 / 33, none dropped.
  kept = []
  for pi in range(3):
    it, info = data.create_dataset(
        _data_config(num_examples=100), split="validation", global_batch_size=9,
        seed=0, train=False, process_index=pi, process_count=3,
        drop_remainder=False)
    assert info.num_examples_per_process == (34 if pi == 0 else 33)
    kept += sum((_keys(b) for b in it), [])
  assert len(kept) == len(set(kept)) == 100


def test_processes_shuffle_their_shards_independently():
  """Shards interleave (process p holds examples p, p + 4, ...): with one
  shuffle order everywhere, row j of every process's batch held neighbouring
  examples, e.g. the ten crops of one image in token files."""
  order = {}
  it, _ = data.create_dataset(_data_config(num_examples=256), split="validation",
                              global_batch_size=256, seed=0, train=False,
                              process_index=0, process_count=1)
  for i, k in enumerate(_keys(next(it))):
    order[k] = i
  groups = []
  for pi in range(4):
    it, _ = data.create_dataset(
        _data_config(num_examples=256, random_flip=False), split="validation",
        global_batch_size=64, seed=0, train=True, process_index=pi,
        process_count=4)
    idx = [order[k] for k in _keys(next(it))]
    assert all(i % 4 == pi for i in idx)
    groups.append([i // 4 for i in idx])     # the example's group of 4 neighbours
  rows_alike = sum(len(set(g)) == 1 for g in zip(*groups))
  assert rows_alike <= 2, rows_alike          # 16 of 16 with one shared order


def test_shuffle_is_deterministic_per_seed_and_reshuffles_each_epoch():
  c = _data_config()
  kw = dict(split="validation", global_batch_size=100, process_index=0,
            process_count=1)
  a = _take(data.create_dataset(c, seed=0, **kw)[0], 20)
  b = _take(data.create_dataset(c, seed=0, **kw)[0], 3)
  d = _take(data.create_dataset(c, seed=1, **kw)[0], 3)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["image"], y["image"])
    np.testing.assert_array_equal(x["label"], y["label"])
  assert not np.array_equal(a[0]["label"], d[0]["label"])
  epoch1 = np.concatenate([x["label"] for x in a[:10]])
  epoch2 = np.concatenate([x["label"] for x in a[10:]])
  assert not np.array_equal(epoch1, epoch2)
  np.testing.assert_array_equal(np.bincount(epoch1), np.bincount(epoch2))


def test_iterator_state_round_trip_through_orbax(tmp_path):
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
  c = _data_config()
  kw = dict(split="validation", global_batch_size=32, seed=7, process_index=0,
            process_count=1)
  it, _ = data.create_dataset(c, **kw)
  _take(it, 29)
  state = it.get_state()
  mngr = ocp.CheckpointManager(tmp_path / "ckpt")
  mngr.save(29, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
  mngr.wait_until_finished()
  expected = _take(it, 4)    # 31 batches per epoch: crosses into epoch 2

  it2, _ = data.create_dataset(c, **kw)
  it2.set_state(state)
  it3, _ = data.create_dataset(c, **kw)
  next(it3)                  # a used iterator is overwritten by the restore
  mngr.restore(29, args=ocp.args.Composite(
      data=grain.checkpoint.CheckpointRestore(it3)))
  for got2, got3, want in zip(_take(it2, 4), _take(it3, 4), expected):
    for got in (got2, got3):
      np.testing.assert_array_equal(got["image"], want["image"])
      np.testing.assert_array_equal(got["label"], want["label"])
  mngr.close()


def test_in_process_and_one_worker_process_agree():
  kw = dict(split="validation", global_batch_size=16, seed=0, process_index=0,
            process_count=1)
  want = _take(data.create_dataset(_data_config(), **kw)[0], 3)
  it, _ = data.create_dataset(_data_config(num_workers=1), **kw)
  got = _take(it, 3)
  it.close()
  for g, w in zip(got, want):
    assert type(g["label"]) is np.ndarray
    np.testing.assert_array_equal(g["image"], w["image"])


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
  c = _data_config(source="image_folder", path=str(root), image_size=16)
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
  c = _data_config(source="image_folder", path=str(root), image_size=16)
  it, _ = data.create_dataset(c, split="train", global_batch_size=2, seed=0,
                              train=True, process_index=0, process_count=1)
  with pytest.raises(data.DataNotFoundError, match="No readable image in"):
    next(it)


def test_image_folder_missing_or_empty_raise_clear_errors(tmp_path):
  kw = dict(split="train", global_batch_size=2, seed=0, process_index=0,
            process_count=1)
  c = _data_config(source="image_folder", path=str(tmp_path / "nope"))
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


# --- TFDS --------------------------------------------------------------------

def test_tfds_not_prepared_raises_how_to_build(tmp_path):
  c = _data_config(source="tfds", name="imagenet2012", path=str(tmp_path))
  with pytest.raises(data.DataNotFoundError) as e:
    data.create_dataset(c, split="train", global_batch_size=2, seed=0,
                        process_index=0, process_count=1)
  msg = str(e.value)
  assert "imagenet2012" in msg and str(tmp_path) in msg
  assert "tfds build imagenet2012" in msg and "array_record" in msg
  assert not list(tmp_path.iterdir())       # nothing downloaded or prepared


def test_a_name_tfds_does_not_know_is_not_told_to_tfds_build(tmp_path):
  """'shapes' (the runlocal demo data's name) under source=tfds: `tfds build
  shapes` fails too, so the message says the name must be a TFDS data set."""
  c = _data_config(source="tfds", name="shapes", path=str(tmp_path))
  with pytest.raises(data.DataNotFoundError,
                     match=r"^config.data.name='shapes' is not a TFDS data set"
                           r".*Set --config.data.name to a TFDS data set, "
                           r"e.g. imagenet2012.*`tfds build imagenet2012 "
                     ) as e:
    data.create_dataset(c, split="train", global_batch_size=2, seed=0,
                        process_index=0, process_count=1)
  assert "tfds build shapes" not in str(e.value)
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
  c = _data_config(source="tfds", name="tiny_genvis_images", path=str(tmp_path),
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


# --- small splits, symlinks, TFDS channels, token records --------------------

def test_more_processes_than_examples_raise_data_config_error():
  """1 example on 2 processes: an empty shard raised a bare StopIteration
  from the first next() of a training iterator."""
  c = _data_config(num_examples=1)
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
  c = _data_config(num_examples=3, random_flip=False)
  it, info = data.create_dataset(c, split="validation", global_batch_size=8,
                                 seed=0, process_index=0, process_count=1)
  assert info.num_examples_per_process == 3 and info.steps_per_epoch == 1
  assert any("fewer than one local batch of 8" in r.getMessage()
             for r in caplog.records)
  for batch in _take(it, 3):     # fills batches, does not spin or stop
    assert batch["image"].shape == (8, 32, 32, 3)
    assert len(set(_keys(batch))) == 3


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


def _fake_tfds(images):
  src = object.__new__(sources.TfdsSource)
  src.name = "fake"
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


def test_an_image_folder_without_a_held_out_split_says_so(tmp_path, caplog):
  (tmp_path / "cat").mkdir()
  with caplog.at_level("WARNING"):
    assert sources.resolve_split_dir(str(tmp_path), "validation") == str(
        tmp_path)
  assert ("has no 'validation' or 'val' sub-folder: split 'validation' reads "
          "the same images as training") in caplog.text
  assert f"{tmp_path / 'val'}/<class_name>/" in caplog.text
  (tmp_path / "val" / "cat").mkdir(parents=True)
  assert sources.resolve_split_dir(str(tmp_path), "validation") == str(
      tmp_path / "val")
