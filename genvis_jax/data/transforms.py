"""Per-record grain transforms: decode, ADM-style crops, flip, float conversion.

Records are dicts ``{"image": uint8 (H, W, 3), "label": int32}``. Random
transforms draw only from the ``np.random.Generator`` grain passes per record
(seeded by the pipeline seed and the record's index), so a record is augmented
identically on every run and after a resume.

The crops follow ADM's ``center_crop_arr`` / ``random_crop_arr``
(openai/guided-diffusion ``image_datasets.py``, also used by LlamaGen/FQGAN and
RAR): halve with BOX filtering while both sides stay >= 2x the target, resize
with BICUBIC so the image just covers the target (shorter side = size for a
square target), then crop. The random variant first picks the cover size
uniformly in ``[ceil(size / max_frac), ceil(size / min_frac)]``, then crops at a
uniform random offset. Non-square targets (``width != size``) generalise this
by covering both sides. ``torchvision_center_crop`` is the other centre crop
an official evaluation uses (1d-tokenizer's), ``torchvision_random_crop`` the
Equivariant generator's training crop, and ``albumentations_center_crop`` /
``albumentations_random_crop`` the Equivariant tokenizer's (taming-style
``ImagePaths``: OpenCV's bilinear resize, no antialiasing).
"""

from __future__ import annotations

import functools
import math

import grain
import numpy as np
from PIL import Image, ImageOps

from genvis_jax.core import pixels
from genvis_jax.errors import ConfigError


# --- pure functions ------------------------------------------------------------

def _floor_centre_crop(image: np.ndarray, height: int, width: int):
  """(height, width) at offsets ``(H - height) // 2``, ``(W - width) // 2``
  (ADM's and albumentations' centre)."""
  top = (image.shape[0] - height) // 2
  left = (image.shape[1] - width) // 2
  return image[top:top + height, left:left + width]


def _uniform_crop(image: np.ndarray, height: int, width: int,
                  rng: np.random.Generator):
  """(height, width) at offsets drawn uniformly from [0, H - height] (first)
  and [0, W - width]."""
  top = int(rng.integers(0, image.shape[0] - height + 1))
  left = int(rng.integers(0, image.shape[1] - width + 1))
  return image[top:top + height, left:left + width]


def _resize_to_cover(image: np.ndarray, height: int, width: int) -> np.ndarray:
  """uint8 (h, w, 3) -> smallest BICUBIC resize covering (height, width)."""
  h, w = image.shape[:2]
  if (h, w) == (height, width):
    return image
  pil = Image.fromarray(image)
  while pil.size[0] >= 2 * width and pil.size[1] >= 2 * height:
    pil = pil.resize((pil.size[0] // 2, pil.size[1] // 2), resample=Image.BOX)
  scale = max(height / pil.size[1], width / pil.size[0])
  new_w = max(width, round(pil.size[0] * scale))
  new_h = max(height, round(pil.size[1] * scale))
  if (new_w, new_h) != pil.size:
    pil = pil.resize((new_w, new_h), resample=Image.BICUBIC)
  return np.asarray(pil)


def center_crop(image: np.ndarray, height: int, width: int | None = None):
  """ADM centre crop: uint8 (h, w, 3) -> uint8 (height, width, 3)."""
  width = width or height
  return _floor_centre_crop(_resize_to_cover(image, height, width), height,
                            width)


def _torchvision_resize(image: np.ndarray, height: int, width: int, resample,
                        instead: str) -> np.ndarray:
  """torchvision ``Resize(height)`` of a PIL image: the short side to
  ``height``, the long side ``int(height * long / short)`` (truncated), PIL's
  ``resample`` filter. Raises ``ConfigError`` naming ``instead`` when the
  result cannot hold a (height, width) crop (torchvision's ``RandomCrop``
  raises there too; its ``CenterCrop`` would pad with zeros)."""
  h, w = image.shape[:2]
  short, long = (w, h) if w <= h else (h, w)
  new_short, new_long = height, int(height * long / short)
  new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
  if (new_h, new_w) != (h, w):
    image = np.asarray(Image.fromarray(image).resize((new_w, new_h),
                                                     resample=resample))
  if new_w < width or new_h < height:
    raise ConfigError(f"A {w}x{h} image resized to {new_w}x{new_h} is smaller "
                      f"than the {width}x{height} crop: every image needs an "
                      f"aspect ratio (width / height) of at least "
                      f"{width / height:.3g}. Use "
                      f"{instead}, or leave such images out of the data.")
  return image


def torchvision_center_crop(image: np.ndarray, height: int,
                            width: int | None = None) -> np.ndarray:
  """torchvision ``Resize(height, BICUBIC)`` of a PIL image, then
  ``CenterCrop((height, width))``: uint8 (h, w, 3) -> (height, width, 3).

  1d-tokenizer's eval transform (``data/webdataset_reader.py``). Unlike ADM's
  crop: no BOX halving, the long side truncated (``int(height * long /
  short)``), and the offsets ``int(round((H - height) / 2.0))`` (halves to
  even). Raises ``ConfigError`` when the resized image is narrower than
  ``width`` (torchvision would pad it with zeros).
  """
  width = width or height
  image = _torchvision_resize(image, height, width, Image.BICUBIC,
                              "the 'adm' centre crop (config.data.center_crop)")
  new_h, new_w = image.shape[:2]
  top = int(round((new_h - height) / 2.0))
  left = int(round((new_w - width) / 2.0))
  return image[top:top + height, left:left + width]


def _smallest_max_size(image: np.ndarray, height: int,
                       width: int) -> np.ndarray:
  """albumentations ``SmallestMaxSize(max_size=height)`` (its default
  ``cv2.INTER_LINEAR``) for a square target: scale = target / short side,
  each side ``round(side * scale)`` (Python's, half to even), OpenCV's
  bilinear resize (half-pixel centres, no antialiasing; fixed-point weights
  for uint8). A non-square target scales so that both sides are covered.
  uint8 (h, w, 3) -> uint8 (>= height, >= width, 3)."""
  import cv2  # pylint: disable=import-outside-toplevel  # only this pipeline's
  h, w = image.shape[:2]
  scale = max(height / h, width / w)
  new_h, new_w = max(height, round(h * scale)), max(width, round(w * scale))
  if (new_h, new_w) == (h, w):
    return image
  return cv2.resize(np.ascontiguousarray(image), (new_w, new_h),
                    interpolation=cv2.INTER_LINEAR)


def albumentations_center_crop(image: np.ndarray, height: int,
                               width: int | None = None) -> np.ndarray:
  """albumentations ``SmallestMaxSize`` + ``CenterCrop`` (offsets ``(H -
  height) // 2``): uint8 (h, w, 3) -> (height, width, 3). The Equivariant
  tokenizer's validation transform (``tokenizer/data/base.py`` ``ImagePaths``,
  ``random_crop=False``)."""
  width = width or height
  return _floor_centre_crop(_smallest_max_size(image, height, width), height,
                            width)


def albumentations_random_crop(image: np.ndarray, height: int,
                               width: int | None,
                               rng: np.random.Generator) -> np.ndarray:
  """albumentations ``SmallestMaxSize`` + ``RandomCrop`` at uniform offsets
  in ``[0, H - height]``: uint8 (h, w, 3) -> (height, width, 3). The
  Equivariant tokenizer's training transform (``ImagePaths``,
  ``random_crop=True``; its flip is ``config.data.random_flip``)."""
  width = width or height
  return _uniform_crop(_smallest_max_size(image, height, width), height, width,
                       rng)


CENTER_CROPS = {"adm": center_crop, "torchvision": torchvision_center_crop,
                "albumentations": albumentations_center_crop}


def random_crop(image: np.ndarray, height: int, width: int | None,
                rng: np.random.Generator, min_frac: float = 1.0,
                max_frac: float = 1.0):
  """ADM random crop: cover a random size, crop at a random offset.

  With ``min_frac = max_frac = 1`` this is "resize the shorter side to the
  target, random crop along the longer side". ``min_frac = 0.8`` is the
  LlamaGen / FQGAN tokenizer augmentation (crop 80-100% of the short side).
  """
  width = width or height
  short = min(height, width)
  lo = math.ceil(short / max_frac)
  hi = math.ceil(short / min_frac)
  cover = int(rng.integers(lo, hi + 1))
  arr = _resize_to_cover(image, math.ceil(height * cover / short),
                         math.ceil(width * cover / short))
  return _uniform_crop(arr, height, width, rng)


def torchvision_random_crop(image: np.ndarray, height: int, width: int | None,
                            rng: np.random.Generator) -> np.ndarray:
  """torchvision ``Resize(height)`` (PIL BILINEAR, antialiased) then
  ``RandomCrop((height, width))`` at uniform offsets: uint8 (h, w, 3) ->
  (height, width, 3). The Equivariant generator's training transform
  (``scripts/train_generator.py``). Raises ``ConfigError`` for an image
  narrower than ``width / height`` (as torchvision's ``RandomCrop``)."""
  width = width or height
  image = _torchvision_resize(image, height, width, Image.BILINEAR,
                              "the 'adm' random crop (config.data.random_crop_method)")
  return _uniform_crop(image, height, width, rng)


# config.data.random_crop_method -> crop(image, height, width, rng); "adm"
# takes the scale range too (RandomCrop binds it).
RANDOM_CROPS = {"adm": random_crop,
                "torchvision_bilinear": torchvision_random_crop,
                "albumentations": albumentations_random_crop}


# config.data.to_float: how uint8 bytes become floats (``to_float``).
TO_FLOAT = ("torchvision", "taming")


def to_float(image: np.ndarray, value_range=(0.0, 1.0),
             formula: str = "torchvision") -> np.ndarray:
  """uint8 [0, 255] (any shape) -> float32 in ``value_range`` (e.g. (-1, 1)).

  ``formula`` (``TO_FLOAT``) picks the official loader it is bit-identical
  to: "torchvision", ``ToTensor`` (``x / 255`` in float32) for (0, 1), then
  ``Normalize(0.5, 0.5)`` (``(u - 0.5) / 0.5``) for (-1, 1) (multiplying by a
  rounded ``2 / 255`` differs in the last bit for about half the byte
  values, which can flip a tokenizer's code); "taming", taming-transformers'
  ``ImagePaths`` (the Equivariant tokenizer's loader): ``x / 127.5 - 1`` in
  float64, then float32, one ulp off the first for half the bytes, in
  (-1, 1); other ranges (e.g. (0, 1) for Inception features of the same
  images) as "torchvision". Raises ``ValueError`` for another formula."""
  lo, hi = (float(v) for v in value_range)
  if formula not in TO_FLOAT:
    raise ValueError(f"to_float formula {formula!r}; one of {TO_FLOAT}.")
  if formula == "taming" and (lo, hi) == (-1.0, 1.0):
    return (image.astype(np.float64) / 127.5 - 1.0).astype(np.float32)
  u = pixels.bytes_to_unit(image)
  if (lo, hi) == (0.0, 1.0):
    return u
  if (lo, hi) == (-1.0, 1.0):   # 2u - 1 == (u - 0.5) / 0.5 bit for bit
    return pixels.unit_to_signed(u)
  return u * np.float32(hi - lo) + np.float32(lo)


_WIDE_GREY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def _to_8bit_rgb(pil: Image.Image) -> np.ndarray:
  """Any PIL mode -> uint8 (H, W, 3).

  16-bit grey (``I;16*``, and ``I`` holding 16-bit values) keeps its high byte
  (``v >> 8``), as PIL itself does when it decodes 16-bit RGB(A) PNGs; a plain
  ``convert("RGB")`` would clip every value above 255 to white. Float (``F``)
  images in [0, 1] are scaled by 255, other float ranges clipped to [0, 255].
  Alpha is dropped (``convert("RGB")``, as the official ADM / LlamaGen / RAR
  loaders do); palette images with transparency go through RGBA first.
  """
  if pil.mode in _WIDE_GREY_MODES:
    wide = np.clip(np.asarray(pil, dtype=np.int64), 0, 65535) >> 8
    grey = wide.astype(np.uint8)
  elif pil.mode == "F":
    x = np.asarray(pil, dtype=np.float64)
    x = x * 255.0 if x.size and np.nanmax(x) <= 1.0 else x
    grey = np.clip(np.rint(np.nan_to_num(x)), 0, 255).astype(np.uint8)
  else:
    if pil.mode == "P" and "transparency" in pil.info:
      pil = pil.convert("RGBA")
    return np.asarray(pil.convert("RGB"))
  return np.repeat(grey[:, :, None], 3, axis=2)


def decode_image(path: str, exif_transpose: bool = False) -> np.ndarray:
  """Reads an image file with PIL -> uint8 (H, W, 3).

  The pixels come as stored, ignoring the EXIF orientation, as the official
  loaders read them (torchvision ``pil_loader``: ``Image.open(f).convert(
  "RGB")``) and as TFDS stores them, so a file gives the same tokens from an
  image folder, TFDS or the official code. ``exif_transpose``
  (``config.data.exif_transpose``) applies the orientation first
  (``PIL.ImageOps.exif_transpose``): a phone photo stored sideways comes out
  upright. Animated files (GIF, APNG, WebP) give their first frame. Grey,
  palette, CMYK, alpha and 16-bit images become 8-bit RGB (see
  ``_to_8bit_rgb``). Raises whatever PIL raises for an unreadable file
  (``DecodeImage`` skips those).
  """
  with open(path, "rb") as f, Image.open(f) as pil:
    pil.seek(0)
    return _to_8bit_rgb(ImageOps.exif_transpose(pil) if exif_transpose
                        else pil)


# --- grain transforms ----------------------------------------------------------

SKIPPED = "skipped_path"   # the key of the record an unreadable file becomes
UNFIT = "unfit"            # ... and of one a training crop could not cut


class DecodeImage(grain.transforms.Map):
  """``{"path", "label"}`` -> ``{"image", "label", "path"}``; an unreadable
  file -> ``{SKIPPED: path, "error": "Type: message"}``. The crops drop the
  path (after naming it in their errors).

  The pipeline passes these markers through the crops, drops them and counts
  the distinct paths (``PipelineInfo.num_skipped``). ``exif_transpose``: see
  ``decode_image`` (default False: pixels as stored, the official loaders').
  """

  def __init__(self, exif_transpose: bool = False):
    self.exif_transpose = bool(exif_transpose)

  def map(self, record):
    try:
      image = decode_image(record["path"], self.exif_transpose)
    except Exception as e:  # pylint: disable=broad-exception-caught
      return {SKIPPED: record["path"], "error": f"{type(e).__name__}: {e}"}
    return {"image": image, "label": np.int32(record["label"]),
            "path": record["path"]}


def check_center_crop(method: str, size: int, width: int | None = None,
                      setting: str = "config.data.center_crop",
                      origin: str = "") -> None:
  """Raises ``ConfigError`` for an unknown centre crop, or the torchvision one
  on non-square (size x width) images; the message names ``setting`` (the
  flag that fixes it) and ``origin`` (where the value came from, default the
  setting itself)."""
  origin = origin or setting
  if method not in CENTER_CROPS:
    raise ConfigError(f"Unknown centre crop {method!r} ({origin}); use one "
                      f"of {sorted(CENTER_CROPS)} (--{setting}).")
  if method == "torchvision" and (width or size) != size:
    raise ConfigError(f"The 'torchvision' centre crop ({origin}) is for "
                      f"square images; {size}x{width} images take the 'adm' "
                      f"one: pass --{setting}=adm.")


def _cropped(record, crop, *args):
  """``record`` with ``crop(record["image"], *args)`` as its image and without
  the decoded file's ``path``; a crop the image cannot give names the file."""
  out = {k: v for k, v in record.items() if k != "path"}
  try:
    out["image"] = crop(record["image"], *args)
  except ConfigError as e:
    if "path" not in record:
      raise
    raise ConfigError(f"{record['path']}: {e}") from None
  return out


class CenterCrop(grain.transforms.Map):
  """Centre crop to (size, width or size): ADM's (``method="adm"``),
  torchvision's Resize + CenterCrop (``"torchvision"``) or albumentations'
  SmallestMaxSize + CenterCrop (``"albumentations"``)."""

  def __init__(self, size: int, width: int | None = None, method: str = "adm",
               setting: str = "config.data.center_crop"):
    check_center_crop(method, size, width, setting)
    self.size, self.width = size, width or size
    self.crop = CENTER_CROPS[method]

  def map(self, record):
    return _cropped(record, self.crop, self.size, self.width)


class RandomCrop(grain.transforms.RandomMap):
  """Random crop to (size, width or size): ADM's (``method="adm"``, cover
  fraction in [min_frac, max_frac]), torchvision's bilinear Resize +
  RandomCrop (``"torchvision_bilinear"``) or albumentations' SmallestMaxSize +
  RandomCrop (``"albumentations"``); the last two have no scale range."""

  def __init__(self, size: int, width: int | None = None,
               min_frac: float = 1.0, max_frac: float = 1.0, method: str = "adm",
               setting: str = "config.data"):
    if not 0 < min_frac <= max_frac <= 1:
      raise ValueError(f"Need 0 < crop_min_frac <= {max_frac} <= 1, got "
                       f"min_frac={min_frac}.")
    if method not in RANDOM_CROPS:
      raise ConfigError(f"Unknown random crop {method!r} "
                        f"({setting}.random_crop_method); use one of "
                        f"{list(RANDOM_CROPS)}.")
    if method != "adm" and min_frac != 1.0:
      raise ConfigError(f"{setting}.crop_min_frac={min_frac} needs the 'adm' "
                        f"random crop; {method!r} crops at the resized scale "
                        "only.")
    self.size, self.width = size, width or size
    self.crop = RANDOM_CROPS[method]
    if method == "adm":
      self.crop = functools.partial(self.crop, min_frac=min_frac,
                                    max_frac=max_frac)

  def random_map(self, record, rng: np.random.Generator):
    # A training image the crop cannot cut (too narrow for torchvision's
    # RandomCrop, which raises) is skipped and counted like an unreadable
    # file: raised, it stopped a long run at whatever step first drew it,
    # and every resume again.
    try:
      return _cropped(record, self.crop, self.size, self.width, rng)
    except ConfigError as e:
      if "path" not in record:
        raise
      return {SKIPPED: record["path"], "error": str(e).split(": ", 1)[-1],
              UNFIT: True}


class RandomFlip(grain.transforms.RandomMap):
  """Horizontal flip with probability 1/2 (NHWC: reverses the W axis)."""

  def random_map(self, record, rng: np.random.Generator):
    if rng.random() < 0.5:
      return {**record, "image": record["image"][:, ::-1]}
    return record


class ToFloat(grain.transforms.Map):
  """``image`` uint8 -> float32 in ``value_range``; works on records and batches."""

  def __init__(self, value_range=(0.0, 1.0), formula: str = "torchvision"):
    self.value_range = tuple(float(v) for v in value_range)
    self.formula = formula

  def map(self, record):
    return {**record, "image": to_float(record["image"], self.value_range,
                                        self.formula)}
