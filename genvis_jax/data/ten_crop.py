"""The crops pre-tokenizing encodes, as the official scripts cut them.

With ten-crop (the official RAR / LlamaGen recipe: RAR
``scripts/pretokenization.py``, LlamaGen / FQGAN ``extract_codes_c2i.py``) every
image goes through ADM's ``center_crop_arr`` at ``int(1.1 * size)`` (281 for
256, 563 for 512; the pipeline cuts it, see :func:`crop_data_config`), then
torchvision ``TenCrop(size)``: the 4 corner + centre crops, then the same five
cut from the mirrored image: 10 records per image. Without it, each image's
``center_crop_arr`` and its mirror image: 2 records per image, as RAR's script
writes (token training cannot flip afterwards).
"""

from __future__ import annotations

import ml_collections
import numpy as np


def ten_crop_cover(size: int) -> int:
  """Side of the centre crop the ten crops are cut from: ``int(size * 1.1)``
  (truncated, as the official scripts' ``int(args.image_size * crop_range)``)."""
  return int(size * 1.1)


def _five_crop(images: np.ndarray, size: int) -> list[np.ndarray]:
  """torchvision ``five_crop`` on (B, H, W, C): tl, tr, bl, br, centre.

  The centre offset is torchvision ``center_crop``'s
  ``int(round((H - size) / 2.0))`` (Python rounds halves to even: 563 -> 512
  starts at 26, not ADM's floor 25)."""
  _, h, w, _ = images.shape
  top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
  boxes = [(0, 0), (0, w - size), (h - size, 0), (h - size, w - size),
           (top, left)]
  return [images[:, y:y + size, x:x + size] for y, x in boxes]


def ten_crop(images: np.ndarray, size: int) -> np.ndarray:
  """torchvision ``TenCrop(size)`` on a batch.

  Args:
    images: (B, H, W, C), any dtype, H and W >= size.
    size: crop side.
  Returns:
    (B, 10, size, size, C): ``five_crop`` (tl, tr, bl, br, centre) of the
    images, then ``five_crop`` of the horizontally flipped images (so crop 5
    is the mirrored top-right corner, not the mirrored top-left).
  Raises:
    ValueError if the images are smaller than ``size``.
  """
  _, h, w, _ = images.shape
  if h < size or w < size:
    raise ValueError(f"ten_crop needs images of at least {size}px, got {h}x{w}.")
  crops = _five_crop(images, size) + _five_crop(images[:, :, ::-1], size)
  return np.stack(crops, axis=1)


def crop_data_config(p) -> ml_collections.ConfigDict:
  """``config.pretokenize.data`` with the centre-crop size the pipeline cuts:
  ``ten_crop_cover(size)`` with ten-crop, else ``size``."""
  data_cfg = ml_collections.ConfigDict(p.data.to_dict())
  if p.ten_crop:
    data_cfg.image_size = ten_crop_cover(p.data.image_size)
  return data_cfg


def model_inputs(images: np.ndarray, labels: np.ndarray, size: int,
                 ten_crop_: bool):
  """A pipeline batch -> what the tokenizer encodes.

  (B, S, S, C) images and (B,) labels -> with ``ten_crop_`` (B*10, size, size,
  C) and (B*10,) (an image's 10 crops are consecutive), else (2B, ...): the
  batch, then its mirror images (RAR's ``torch.cat([x, x.flip(-1)])``)."""
  if not ten_crop_:
    return (np.concatenate([images, images[:, :, ::-1]]),
            np.concatenate([labels, labels]))
  crops = ten_crop(images, size)
  return crops.reshape(-1, size, size, images.shape[-1]), np.repeat(labels, 10)
