"""Image folders with odd files: 16-bit, EXIF-rotated, every PIL format, corrupt."""

import io
import logging
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from configs import base
from genvis_jax import data
from genvis_jax.data import sources, transforms

RED, BLUE = (255, 0, 0), (0, 0, 255)
GRADIENT16 = (np.arange(24 * 32, dtype=np.uint32).reshape(24, 32) * 85 + 7
              ).astype(np.uint16)          # 7 .. 65262, low bytes all differ


def _png16_rgb(path, rgb16: np.ndarray):
  """A 16-bit RGB PNG written by hand (PIL cannot save one): signature, IHDR
  (bit depth 16, colour type 2), one zlib IDAT of filter-0 big-endian rows, IEND."""
  h, w, _ = rgb16.shape

  def chunk(kind, body):
    return (struct.pack(">I", len(body)) + kind + body
            + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))

  rows = b"".join(b"\0" + rgb16[y].astype(">u2").tobytes() for y in range(h))
  path.write_bytes(b"\x89PNG\r\n\x1a\n"
                   + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
                   + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def _exif_rotated_jpeg(path):
  """Stored 40 wide x 20 high, left half red; EXIF orientation 6 says "rotate
  90 degrees clockwise to display", so it shows 20 wide x 40 high, red on top.
  Returns ``(stored, displayed)``."""
  arr = np.zeros((20, 40, 3), np.uint8)
  arr[:, :20], arr[:, 20:] = RED, BLUE
  exif = Image.Exif()
  exif[0x0112] = 6
  Image.fromarray(arr).save(path, quality=95, exif=exif.tobytes())
  return arr, np.rot90(arr, k=-1)    # clockwise: the displayed image


@pytest.fixture(scope="module")
def odd_folder(tmp_path_factory):
  """a/: 10 readable images of odd kinds + 2 corrupt + 1 text file; b/: 3 PNGs.

  Returns ``(root, {file name: expected uint8 (H, W, 3) or None})``.
  """
  root = tmp_path_factory.mktemp("odd")
  a, b = root / "a", root / "b"
  a.mkdir(), b.mkdir()
  want = {}
  Image.fromarray(GRADIENT16).save(a / "grey16.png")           # mode I;16
  want["grey16.png"] = np.repeat(GRADIENT16[:, :, None], 3, 2)
  rgb16 = np.stack([GRADIENT16, GRADIENT16[::-1], 65535 - GRADIENT16], -1)
  _png16_rgb(a / "rgb16.png", rgb16)
  want["rgb16.png"] = rgb16
  # As stored: the official loaders (and TFDS) ignore the EXIF orientation.
  want["rotated.jpg"] = _exif_rotated_jpeg(a / "rotated.jpg")[0]
  frames = [Image.new("P", (30, 20), 0), Image.new("P", (30, 20), 1)]
  for f in frames:
    f.putpalette(list(RED) + list(BLUE) + [0] * 762)
  frames[0].save(a / "anim.gif", save_all=True, append_images=frames[1:])
  want["anim.gif"] = np.full((20, 30, 3), RED, np.uint8)   # first frame only
  solid = np.full((18, 26, 3), (10, 200, 30), np.uint8)
  Image.fromarray(solid).save(a / "solid.bmp")
  Image.fromarray(solid).save(a / "solid.webp", lossless=True)
  Image.fromarray(solid).save(a / "solid.TIFF")
  want.update({"solid.bmp": solid, "solid.webp": solid, "solid.TIFF": solid})
  grey = np.tile(np.arange(0, 250, 10, dtype=np.uint8), (16, 1))
  Image.fromarray(grey, "L").save(a / "grey8.png")
  want["grey8.png"] = np.repeat(grey[:, :, None], 3, 2)
  rgba = np.zeros((16, 16, 4), np.uint8)
  rgba[..., :3], rgba[..., 3] = (40, 50, 60), np.arange(16)[:, None] * 16
  Image.fromarray(rgba, "RGBA").save(a / "alpha.png")
  want["alpha.png"] = rgba[..., :3]       # alpha dropped, as convert("RGB")
  pal = Image.new("P", (12, 14), 1)
  pal.putpalette(list(RED) + list(BLUE) + [0] * 762)
  pal.save(a / "palette.png", transparency=0)
  want["palette.png"] = np.full((14, 12, 3), BLUE, np.uint8)
  (a / "random.jpg").write_bytes(np.random.default_rng(0).bytes(400))
  buf = io.BytesIO()
  Image.fromarray(solid).save(buf, "PNG")
  (a / "cut.png").write_bytes(buf.getvalue()[:60])
  want["random.jpg"] = want["cut.png"] = None
  (a / "notes.txt").write_text("not an image")
  for i in range(3):
    Image.new("RGB", (20 + i, 20), BLUE).save(b / f"{i}.png")
  return root, want


def test_every_pil_format_is_listed():
  for ext in (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff"):
    assert ext in sources.IMAGE_EXTENSIONS
  assert ".txt" not in sources.IMAGE_EXTENSIONS
  assert ".h5" not in sources.IMAGE_EXTENSIONS   # a PIL stub: cannot decode


def test_decode_odd_images(odd_folder):
  root, want = odd_folder
  for name, expected in want.items():
    if expected is None:
      with pytest.raises(Exception):
        transforms.decode_image(str(root / "a" / name))
      continue
    got = transforms.decode_image(str(root / "a" / name))
    assert got.dtype == np.uint8 and got.shape == expected.shape, name
    if expected.dtype == np.uint16:
      # 16 -> 8 bits by scaling (v * 255 / 65535, rounded; v >> 8 is within 1),
      # not by clipping to 255 (which turns almost every pixel white).
      scaled = np.rint(expected.astype(np.float64) * 255 / 65535)
      assert np.abs(got - scaled).max() <= 1, name
      assert (got == 255).mean() < 0.01, name
    elif name.endswith(".jpg"):      # lossy: compare colours, not bytes
      assert np.abs(got.astype(int) - expected).mean() < 8, name
    else:
      np.testing.assert_array_equal(got, expected, err_msg=name)


def test_exif_orientation_only_when_asked(tmp_path):
  """The official loaders (torchvision ``pil_loader``) and TFDS ignore EXIF:
  by default the pixels come as stored, so a file gives the same tokens from
  an image folder as from TFDS; ``config.data.exif_transpose`` turns it
  upright first."""
  stored, shown = _exif_rotated_jpeg(tmp_path / "r.jpg")
  for flag, want in ((False, stored), (True, shown)):
    got = transforms.decode_image(str(tmp_path / "r.jpg"), exif_transpose=flag)
    assert got.shape == want.shape, flag
    assert np.abs(got.astype(int) - want).mean() < 8, flag
  assert transforms.decode_image(str(tmp_path / "r.jpg")).shape == (20, 40, 3)
  # Through the pipeline: the 16 x 16 centre crop has red on the left
  # (stored) or on top (upright).
  (tmp_path / "imgs" / "a").mkdir(parents=True)
  (tmp_path / "r.jpg").rename(tmp_path / "imgs" / "a" / "r.jpg")
  for flag in (None, False, True):
    c = base.get_config().data
    c.update(source="image_folder", path=str(tmp_path / "imgs"),
             image_size=16, prefetch=0, read_threads=1)
    if flag is not None:
      c.exif_transpose = flag     # config.data.exif_transpose
    it, _ = data.create_dataset(c, split="train", global_batch_size=1,
                                seed=0, train=False, process_index=0,
                                process_count=1)
    x = next(it)["image"][0]
    first, last = (x[:4], x[-4:]) if flag else (x[:, :4], x[:, -4:])
    assert first[..., 0].mean() > 0.8 and first[..., 2].mean() < 0.2, flag
    assert last[..., 2].mean() > 0.8 and last[..., 0].mean() < 0.2, flag


def test_folder_pipeline_counts_distinct_skipped_files(odd_folder, caplog,
                                                      monkeypatch):
  root, want = odd_folder
  from genvis_jax.data import skips  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(skips, "EPOCH_LOG_INTERVAL_S", 0.0)   # every epoch
  c = base.get_config().data
  c.update(source="image_folder", path=str(root), image_size=16, prefetch=2,
           read_threads=2, random_flip=True, random_crop=True)
  caplog.set_level(logging.INFO, logger="absl")
  # torchvision's suffixes by default, as the official loaders: no .gif.
  _, info = data.create_dataset(c, split="train", global_batch_size=4, seed=0,
                                process_index=0, process_count=1)
  assert info.num_examples == 14
  assert ("1 of them are images of other formats (e.g. " in caplog.text
          and "config.data.extensions=pil reads them" in caplog.text)
  c.extensions = "pil"
  it, info = data.create_dataset(c, split="train", global_batch_size=4, seed=0,
                                 process_index=0, process_count=1)
  assert info.num_examples == len(want) + 3 == 15   # .txt not listed
  assert info.class_names == ("a", "b")
  good_per_epoch = len(want) - 2 + 3               # 13
  labels = []
  for _ in range(7):                               # 28 images: > 2 epochs
    batch = next(it)
    assert batch["image"].shape == (4, 16, 16, 3)
    assert batch["image"].dtype == np.float32
    assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0
    labels += batch["label"].tolist()
  assert labels[:2 * good_per_epoch].count(1) == 2 * 3
  # Each corrupt file was met twice; distinct files count once.
  assert info.num_skipped == 2
  epochs = [r.getMessage() for r in caplog.records
            if "num_skipped_files" in r.getMessage()]
  assert len(epochs) == 2, epochs
  assert all(m.endswith("num_skipped_files=2") for m in epochs)
  # The files survive a restore of the iterator state.
  it2, info2 = data.create_dataset(c, split="train", global_batch_size=4,
                                   seed=0, process_index=0, process_count=1)
  it2.set_state(it.get_state())
  assert info2.num_skipped == 2
  np.testing.assert_array_equal(next(it2)["image"], next(it)["image"])
  # By default a small set's epochs log at most once a minute.
  monkeypatch.undo()
  caplog.clear()
  for _ in range(7):                               # two more epochs
    next(it2)
  epochs = [r.getMessage() for r in caplog.records
            if "num_skipped_files" in r.getMessage()]
  assert len(epochs) == 1, epochs
