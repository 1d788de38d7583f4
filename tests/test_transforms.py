"""Demo data and image transforms (crops, flips, resizes, bytes to floats)
against the official recipes."""

import numpy as np
import pytest
from PIL import Image

from configs import eq_tokenizer
from genvis_jax.data import demo, transforms
from genvis_jax.errors import ConfigError
from tests import pipeline_common as pc


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
  # Crop fraction 0.8 (LlamaGen's random_crop_arr, FQGAN's tokenizers): the
  # short side covers 32..40 px, so most crops are of a resized image (1 in
  # 9 keeps 32), and the output size stays.
  scaled = [transforms.random_crop(img, 32, None, np.random.default_rng(s),
                                   min_frac=0.8) for s in range(20)]
  assert {o.shape for o in scaled} == {(32, 32, 3)}
  resized = sum(not any(np.array_equal(o, img[:, x:x + 32]) for x in range(17))
                for o in scaled)
  assert resized >= 12, resized

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


def test_pipeline_floats_are_torchvision_totensor_normalize():
  """RAR feeds ToTensor (x / 255), LlamaGen / FQGAN then Normalize(0.5, 0.5):
  the exact float32 inputs, for every byte value."""
  k = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1)
  to_tensor = k.astype(np.float32) / np.float32(255)
  normalized = (to_tensor - np.float32(0.5)) / np.float32(0.5)
  np.testing.assert_array_equal(transforms.to_float(k, (0.0, 1.0)), to_tensor)
  np.testing.assert_array_equal(transforms.to_float(k, (-1, 1)), normalized)


def test_the_equivariant_tokenizers_floats_are_taming_imagepaths():
  """Its ImagePaths: (image / 127.5 - 1.0).astype(np.float32) on the uint8
  array (a float64 division). Through ToTensor / Normalize, half the byte
  values were one ulp off; the eq_tokenizer config reads them as taming does,
  in training and evaluation alike (the pipeline)."""
  from genvis_jax import data as data_lib   # pylint: disable=import-outside-toplevel
  k = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1)
  taming = (k / 127.5 - 1.0).astype(np.float32)
  to_tensor = k.astype(np.float32) / np.float32(255)
  np.testing.assert_array_equal(transforms.to_float(k, (-1, 1), "taming"),
                                taming)
  assert (transforms.to_float(k, (-1, 1)) != taming).sum() == 128
  c = eq_tokenizer.get_config("runlocal")
  assert c.data.to_float == "taming"
  it, _ = data_lib.create_dataset(c.data, split="train", global_batch_size=2,
                                  seed=0, train=False, value_range=(-1, 1))
  img = next(iter(it))["image"]
  from genvis_jax.data import pipeline   # pylint: disable=import-outside-toplevel
  src, _, _ = pipeline.make_source(c.data, "train")
  raw = transforms.CENTER_CROPS["albumentations"](
      src[0]["image"], c.data.image_size, c.data.image_width)
  np.testing.assert_array_equal(img[0], transforms.to_float(raw, (-1, 1),
                                                            "taming"))
  # Images read in (0, 1) (a reference's, rFID's): ToTensor's, as before
  # (kind=reference with this config failed with a ValueError).
  np.testing.assert_array_equal(transforms.to_float(k, (0, 1), "taming"),
                                to_tensor)
  from genvis_jax.evaluate import reference   # pylint: disable=import-outside-toplevel
  _, batches = reference.dataset_images(c.data, "validation", 4, 4)
  assert next(batches).dtype == np.uint8
  with pytest.raises(ValueError, match=r"to_float='tv'; one of"):
    c.data.to_float = "tv"
    data_lib.create_dataset(c.data, split="train", global_batch_size=2,
                            seed=0, train=False, value_range=(-1, 1))
