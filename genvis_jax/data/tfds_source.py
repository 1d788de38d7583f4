"""The TFDS source: a prepared data set read with ``tfds.data_source``
(ArrayRecord), ``{"image": uint8 (H, W, 3), "label": int32}`` (grey and alpha
images converted as PIL's ``convert("RGB")``: ``to_rgb``). Nothing is
downloaded or prepared here (``prepare_tfds`` prepares).
"""

from __future__ import annotations

import os

import numpy as np
from absl import logging

from genvis_jax.core import files
from genvis_jax.data import transforms
from genvis_jax.data.sources import DataConfigError, DataNotFoundError


def _tfds_howto(name: str, data_dir, setting: str = "config.data") -> str:
  # Not `tfds build`: its command line imports Apache Beam (not installed).
  where = data_dir or "<data_dir>"
  manual = ("; for imagenet2012 put ILSVRC2012_img_train.tar and "
            "ILSVRC2012_img_val.tar in --manual_dir") if "imagenet" in name else ""
  return (f"Prepare it in ArrayRecord format first: `python -m "
          f"genvis_jax.data.prepare_tfds --name={name} --data_dir={where} "
          f"--manual_dir=<dir with the downloaded files>`{manual}. Then set "
          f"{setting}.path to that data_dir.")


def is_array_record(builder) -> bool:
  """Whether a prepared TFDS ``builder`` is stored as ArrayRecord."""
  return "array_record" in str(builder.info.file_format).lower()


class TfdsSource:
  """A prepared TFDS data set read with ``tfds.data_source`` (ArrayRecord).

  Never downloads or prepares anything: a missing or non-ArrayRecord data set
  raises ``DataNotFoundError`` naming the data set, ``data_dir`` and the
  ``prepare_tfds`` command. ``source[i]`` -> ``{"image": uint8 (H, W, 3),
  "label": int32, "path": "<name>/<split>[i]"}``, the path naming the record
  as an image folder's names its file (the crops drop it). A record TFDS
  cannot decode (damaged image bytes) becomes a skip marker
  ``{transforms.SKIPPED: path, "error": ...}``, skipped and counted as an
  image folder's unreadable file is.
  """

  def __init__(self, name: str, split: str, data_dir: str | None = None,
               setting: str = "config.data", split_key: str = "split",
               label_limit: int | None = None):
    """``setting``: the config section naming the data set, ``split_key`` its
    key holding ``split`` (``split`` or ``eval_split``; both for messages).
    ``label_limit``: ``setting.num_classes``, the bound a label that is not a
    ``ClassLabel`` (no class count to check up front) is checked against as
    each record is read (``DataConfigError`` past it)."""
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    if not name:
      raise DataConfigError(f"{setting}.name is empty: set the TFDS data set "
                            "name, e.g. imagenet2012.")
    self.name, self.split, self.data_dir = name, split, data_dir or None
    # config.data.path at the data set's own folder (what `gcloud storage cp
    # -r .../imagenet2012 $B/tfds/` makes): the fix is its parent, not a
    # rebuild of the data set.
    inside = _inside_data_set(self.data_dir, name.split("/")[0].split(":")[0])
    try:
      builder = tfds.builder(name, data_dir=self.data_dir)
    except tfds.core.DatasetNotFoundError as e:
      if inside:
        raise DataNotFoundError(f"{setting}.path={self.data_dir!r} {inside}") from e
      # Neither prepared in data_dir nor a data set TFDS can build: `tfds
      # build NAME` would fail too (e.g. the demo's name "shapes").
      where = self.data_dir or "$TFDS_DATA_DIR (default ~/tensorflow_datasets)"
      raise DataNotFoundError(
          f"{setting}.name={name!r} is not a TFDS data set (none in TFDS's "
          f"catalogue, https://www.tensorflow.org/datasets/catalog, and none "
          f"prepared under that name in {where}). Set --{setting}.name to a "
          f"TFDS data set, e.g. imagenet2012. "
          f"{_tfds_howto('imagenet2012', self.data_dir, setting)}") from e
    except Exception as e:  # broken registry entry, bad version, storage
      if files.is_remote(self.data_dir or ""):
        raise DataNotFoundError(
            f"TFDS data set {name!r}: {setting}.path={self.data_dir!r} could "
            f"not be read ({str(e).splitlines()[0]}). Check the network and "
            f"the credentials (`gcloud storage ls {self.data_dir}`).") from e
      raise DataNotFoundError(
          f"TFDS data set {name!r} could not be loaded from data_dir="
          f"{self.data_dir!r}: {str(e).splitlines()[0]} "
          f"{_tfds_howto(name, self.data_dir, setting)}") from e
    if not builder.is_prepared():
      if inside:
        raise DataNotFoundError(f"{setting}.path={self.data_dir!r} {inside}")
      raise DataNotFoundError(
          f"TFDS data set {name!r} is not prepared in data_dir="
          f"{self.data_dir or builder.data_dir_root!r} (looked for "
          f"{builder.data_dir}). {_tfds_howto(name, self.data_dir, setting)}")
    if not is_array_record(builder):
      raise DataNotFoundError(
          f"TFDS data set {name!r} in {builder.data_dir} is stored as "
          f"{builder.info.file_format}, but random access needs ArrayRecord, "
          "and TFDS keeps one format per folder: prepare it into another "
          f"data_dir. {_tfds_howto(name, '<another data_dir>', setting)} (Or "
          f"delete {builder.data_dir} and prepare it where it was.)")
    try:   # a split, or TFDS's slices and sums of them ("train[:5%]")
      builder.info.splits[split]   # pylint: disable=pointless-statement
    except (KeyError, ValueError, AssertionError) as e:
      raise DataConfigError(f"TFDS data set {name!r} has no split {split!r}; it has "
                       f"{list(builder.info.splits)} (and TFDS slices of them, "
                       f"e.g. 'train[:5%]'). Set --{setting}.{split_key} to one "
                       "of them.") from e
    if "image" not in builder.info.features:
      raise DataConfigError(f"TFDS data set {name!r} has features "
                       f"{list(builder.info.features)}; an image data set with "
                       "an 'image' feature (and 'label' for classes) is needed.")
    # Images only (tokenizers, references need no class): all of class 0.
    self.labelled = "label" in builder.info.features
    if not self.labelled:
      logging.warning("TFDS data set %r has no 'label' feature: every image is "
                      "read as class 0 (one class).", name)
    self.num_classes = (_num_classes(builder.info.features) if self.labelled
                        else 1)
    self._label_limit = label_limit if self.num_classes is None else None
    # What a resume compares (``PipelineInfo.listing``).
    self.release = f"{builder.name}:{builder.version} {split}"
    self._setting = setting
    self._source = tfds.data_source(name, split=split, data_dir=self.data_dir,
                                    download=False)

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index):
    path = f"{self.name}/{self.split}[{int(index)}]"
    try:   # TFDS decodes the image here
      record = self._source[int(index)]
    except Exception as e:  # pylint: disable=broad-exception-caught
      return {transforms.SKIPPED: path, "error": f"{type(e).__name__}: {e}"}
    image = to_rgb(record["image"], f"TFDS data set {self.name!r}")
    label = int(record["label"]) if self.labelled else 0
    if self._label_limit is not None and not 0 <= label < self._label_limit:
      raise DataConfigError(
          f"{path} has label {label}, outside 0..{self._label_limit - 1} "
          f"({self._setting}.num_classes={self._label_limit}); its 'label' "
          "feature is not a ClassLabel, so its class count is unknown. Set "
          f"--{self._setting}.num_classes above its largest label (and "
          "--config.model.num_classes with it).")
    return {"image": image, "label": np.int32(label), "path": path}

  def __repr__(self):
    return f"TfdsSource({self.name!r}, split={self.split!r}, n={len(self)})"


def to_rgb(image, where: str = "an image data set") -> np.ndarray:
  """(H, W) or (H, W, C) with C in 1..4 -> (H, W, 3), as PIL's
  ``convert("RGB")`` does in the official loaders (torchvision ``pil_loader``):
  grey (``L``) and grey + alpha (``LA``) repeat the grey value, RGBA drops its
  alpha without compositing it onto any background. 16-bit values keep their
  high byte (``v >> 8``), as image folders' 16-bit files do
  (``transforms._to_8bit_rgb``, PIL's own 16-bit RGB decode); the result is
  uint8. That holds for a feature declared ``dtype=tf.uint16``: one declared
  uint8 (the default) holding 16-bit PNGs reaches us already cast by TFDS's
  decoder, which keeps the low byte (``astype``), so those pixels differ from
  the same files read as an image folder.

  Raises ``DataConfigError`` naming ``where`` for any other shape or dtype
  (float images: their range is unknown).
  """
  image = np.asarray(image)
  if image.dtype == np.uint16:
    image = (image >> 8).astype(np.uint8)
  elif image.dtype != np.uint8:
    raise DataConfigError(
        f"{where} has an image of dtype {image.dtype}; uint8 (or 16-bit, read "
        "as its high byte) images are needed: their values are divided by "
        "255. Store the images as uint8 (tfds.features.Image's default).")
  if image.ndim == 2:
    image = image[:, :, None]
  if image.ndim != 3 or not 1 <= image.shape[-1] <= 4:
    raise DataConfigError(
        f"{where} has an image of shape {image.shape}; images of 1 (grey), "
        "2 (grey + alpha), 3 (RGB) or 4 (RGBA) channels are needed. Use an "
        "image data set with such images (or an image folder).")
  channels = image.shape[-1]
  if channels == 3:
    return image
  if channels <= 2:
    return np.repeat(image[:, :, :1], 3, axis=2)
  return np.ascontiguousarray(image[:, :, :3])


def _inside_data_set(data_dir: str | None, name: str) -> str:
  """Why ``data_dir`` is a TFDS data set's own folder (``<root>/<name>`` or
  ``<root>/<name>/<version>``) rather than the root TFDS reads, with the
  fix; "" otherwise."""
  if not data_dir:
    return ""
  path = data_dir.rstrip("/")
  up = os.path.dirname(path)
  if os.path.basename(path) == name:
    parent = up
  elif os.path.basename(up) == name and _exists(
      os.path.join(path, "dataset_info.json")):
    parent = os.path.dirname(up)
  else:
    return ""
  return (f"is the folder of the data set {name!r} itself; TFDS reads the "
          f"folder above it: set it to {parent!r}.")


def _exists(path: str) -> bool:
  from etils import epath  # pylint: disable=import-outside-toplevel
  try:
    return epath.Path(path).exists()
  except Exception:  # pylint: disable=broad-except
    return False


def _num_classes(features) -> int | None:
  return getattr(features["label"], "num_classes", None)
