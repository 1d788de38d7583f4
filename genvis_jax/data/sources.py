"""Random-access data sources: an image folder and TFDS ``data_source``.

Every source is a grain ``RandomAccessDataSource`` (``__len__``,
``__getitem__``) that checks its files when it is built, so a wrong path fails
before any compile, with a message that says how to fix it. Records:

* ``ImageFolderSource``: ``{"path": str, "label": int32}`` (decoded lazily by
  ``transforms.DecodeImage``; the pipeline skips unreadable files and counts
  them);
* ``TfdsSource``: ``{"image": uint8 (H, W, 3), "label": int32}`` (grey and
  alpha images converted as PIL's ``convert("RGB")``: ``to_rgb``).

The demo source lives in ``demo.py``, the token files source in ``tokens.py``.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np
from absl import logging

from genvis_jax.core import files
from genvis_jax.errors import UserError

# PIL formats that are not images we can decode on their own: identify-only
# stubs (BUFR, GRIB, HDF5, MPEG, IPTC), EPS (needs Ghostscript), WMF (Windows).
_NOT_DECODABLE = frozenset({"BUFR", "GRIB", "HDF5", "MPEG", "IPTC", "EPS", "WMF"})


def image_extensions() -> tuple[str, ...]:
  """Lower-case suffixes of every format this PIL build can decode.

  Includes .jpg/.jpeg/.png, .gif (first frame), .bmp, .webp, .tif/.tiff, ...
  (``PIL.Image.registered_extensions`` restricted to formats with an opener).
  """
  from PIL import Image  # pylint: disable=import-outside-toplevel
  Image.init()
  return tuple(sorted(ext.lower() for ext, fmt in
                      Image.registered_extensions().items()
                      if fmt in Image.OPEN and fmt not in _NOT_DECODABLE))


IMAGE_EXTENSIONS = image_extensions()


class DataNotFoundError(UserError, FileNotFoundError):
  """A data set is missing, empty or not prepared; the message says how to fix it."""


class DataConfigError(UserError, ValueError):
  """``config.data`` does not fit the data (split, classes, batch, source kind)."""


# Every config.data.source; all but "tokens" (pre-tokenized codes) give images.
SOURCES = ("demo", "demo_landscapes", "image_folder", "tfds", "tokens")
IMAGE_SOURCES = tuple(s for s in SOURCES if s != "tokens")


def check_source(source: str, setting: str, reader: str,
                 allowed: tuple[str, ...] = IMAGE_SOURCES) -> None:
  """Refuses a ``{setting}.source`` outside ``allowed`` (the image sources,
  or ``("tokens",)`` where pre-tokenized codes are read), saying whether it
  is unknown, gives codes or gives images; ``reader`` says what reads it
  (e.g. "the tokenizer task trains on images"). Runs before any data is
  opened, whose own error would mislead (an empty token-file path).

  Raises:
    DataConfigError: naming the setting, what the source gives and the
      sources that fit.
  """
  if source in allowed:
    return
  if tuple(allowed) == ("tokens",):
    choose = (f"set --{setting}.source=tokens and --{setting}.path to the "
              "token files --config.mode=pretokenize writes")
  else:
    choose = f"set --{setting}.source to one of {', '.join(allowed)}"
  if source not in SOURCES:
    raise DataConfigError(
        f"Unknown {setting}.source {source!r}; {reader}: {choose}.")
  if source == "tokens":
    raise DataConfigError(
        f"{setting}.source='tokens' gives pre-tokenized codes, and {reader}: "
        f"{choose}.")
  raise DataConfigError(
      f"{setting}.source={source!r} gives images, and {reader}: pre-tokenize "
      "them first (--config.mode=pretokenize, with the images in "
      f"config.pretokenize.data), then {choose}.")


# --- image folder --------------------------------------------------------------

# Sub-folder names that are splits, not classes (``validation`` also reads
# ``val``); folders a class listing skips besides hidden ones (macOS zips
# leave ``__MACOSX/`` beside the class folders).
SPLIT_FOLDERS = ("train", "validation", "val", "test")
NOT_CLASSES = ("__MACOSX",)


def _folders(path: str) -> list[str]:
  return sorted(e.name for e in os.scandir(path) if e.is_dir()
                and not e.name.startswith(".") and e.name not in NOT_CLASSES)


def resolve_split_dir(path: str, split: str, setting: str = "config.data",
                      train_split: str = "train") -> str:
  """The folder holding ``split``'s class folders: ``path`` itself
  (``path/<class_name>/``), or ``path/<split>`` where ``path`` holds split
  folders only (``train``, ``val`` / ``validation``, ``test``). A split
  without its folder reads ``train_split``'s (with a warning: its metrics
  are not held-out ones). ``setting``: the config section naming ``path``.

  Raises:
    DataNotFoundError: an empty or missing ``path``; split folders without
      ``train_split``'s.
    DataConfigError: a remote ``path``, or one holding split folders beside
      class folders (a class named ``train``, or held-out images put beside
      the classes, would be read as the other: refused, naming both).
  """
  if not path:
    raise DataNotFoundError(
        f"{setting}.path is empty: set it to an image folder laid out as "
        "<path>/<class_name>/*.jpg (or <path>/<split>/<class_name>/*.jpg).")
  if files.is_remote(path):
    raise DataConfigError(
        f"{setting}.path={path!r} is remote; image folders are read from "
        "local disk. Copy the folder to each worker (e.g. `gcloud storage cp "
        "-r`), or prepare the data set with TFDS (source 'tfds').")
  if not os.path.isdir(path):
    raise DataNotFoundError(
        f"Image folder {path!r} does not exist ({setting}.path). Expected "
        "<path>/<class_name>/*.jpg or <path>/<split>/<class_name>/*.jpg.")
  folders = _folders(path)
  splits = [f for f in folders if f in SPLIT_FOLDERS]
  if not splits:
    if split != train_split:
      logging.warning(
          "Image folder %r holds class folders only: split %r reads the same "
          "images as training, so its metrics are not held-out ones. For "
          "held-out images use %s/train/<class_name>/ and "
          "%s/val/<class_name>/.", path, split, path, path)
    return path
  classes = [f for f in folders if f not in SPLIT_FOLDERS]
  if classes:
    raise DataConfigError(
        f"Image folder {path!r} ({setting}.path) holds split folders "
        f"{splits} beside class folders {classes[:5]}: the split folders "
        "would be read as classes (held-out images trained on), or a class "
        "named like a split as the split. Use one layout: "
        "<path>/<class_name>/ for one split, or <path>/train/<class_name>/ "
        "and <path>/val/<class_name>/ (move the class folders into "
        "train/).")

  def folder(name):
    for f in [name] + (["val"] if name == "validation" else []):
      if f in splits:
        return os.path.join(path, f)
    return None

  found = folder(split)
  if found:
    return found
  train = folder(train_split)
  if train is None:
    raise DataNotFoundError(
        f"Image folder {path!r} ({setting}.path) holds split folders "
        f"{splits} but none for the training split {train_split!r}: put its "
        f"class folders in {os.path.join(path, train_split)}/.")
  logging.warning(
      "Image folder %r has no %r folder: split %r reads the training split's "
      "images (%s), so its metrics are not held-out ones. Put held-out "
      "images under %s/<class_name>/ to evaluate on them.", path,
      "val" if split == "validation" else split, split, train,
      os.path.join(path, "val" if split == "validation" else split))
  return train


def list_classes(root: str) -> tuple[str, ...]:
  """Sorted names of the class sub-folders of ``root`` (not hidden ones, nor
  ``NOT_CLASSES``); labels are their indices."""
  classes = tuple(_folders(root))
  if not classes:
    raise DataNotFoundError(
        f"Image folder {root!r} has no class sub-folders. Put the images of "
        f"each class in {root}/<class_name>/ (any image format PIL reads: "
        ".jpg, .png, .gif, .bmp, .webp, .tif, ...).")
  return classes


def _unlistable(e: OSError):
  raise DataNotFoundError(
      f"Image folder: cannot list {e.filename} ({type(e).__name__}: "
      f"{e.strerror or e}); its images would be left out without a word. "
      "Fix its permissions (or the mount), or move it out of the class "
      "folder.") from e


def _walk_images(class_dir: str) -> tuple[list[str], list[str]]:
  """Sorted image paths under ``class_dir`` (recursive), following symbolic
  links to folders as torchvision's ``ImageFolder`` does (``os.walk(...,
  followlinks=True)``, the official loaders), and the other files found
  (not hidden, not macOS ``._*`` companions), which are not listed. A folder
  reached again (a link to one of its ancestors, or a second link to the
  same folder) is walked once: its real path is remembered, so a link loop
  cannot recurse forever. Raises ``DataNotFoundError`` for a sub-folder
  that cannot be listed (``os.walk`` skipped it silently)."""
  found, other, seen = [], [], {os.path.realpath(class_dir)}
  for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True,
                                              onerror=_unlistable):
    kept = []
    for d in sorted(dirnames):
      real = os.path.realpath(os.path.join(dirpath, d))
      if real in seen:
        logging.warning("Image folder: not walking %s again (it leads to %s, "
                        "already listed: a symbolic link loop or a second "
                        "link to one folder).", os.path.join(dirpath, d), real)
        continue
      seen.add(real)
      kept.append(d)
    dirnames[:] = kept
    for f in filenames:
      if f.startswith("."):   # hidden, and macOS's ._<name> companions
        continue
      (found if f.lower().endswith(IMAGE_EXTENSIONS) else other).append(
          os.path.join(dirpath, f))
  return sorted(found), sorted(other)


def list_images(root: str, classes: tuple[str, ...]) -> tuple[list[str], np.ndarray]:
  """Sorted image paths under ``root/<class>/`` (recursive, following
  symbolic links to folders) and int32 labels.

  Raises:
    DataNotFoundError: no image at all, or a class folder without an image
      file (it would take a label and shift every later class by one;
      torchvision's ``ImageFolder`` refuses it too). A class folder a split
      does not have is allowed (an evaluation split may lack classes).
  """
  paths, labels, empty, other = [], [], [], []
  for label, name in enumerate(classes):
    class_dir = os.path.join(root, name)
    if not os.path.isdir(class_dir):
      continue  # a split may lack a class of the training split
    found, not_images = _walk_images(class_dir)
    if not found:
      empty.append(name)
    paths += found
    other += not_images
    labels += [label] * len(found)
  if other:   # as torchvision's ImageFolder, by suffix; said, not silent
    logging.warning(
        "Image folder %r: %d file(s) without an image suffix are not listed, "
        "e.g. %s (suffixes read: %s).", root, len(other),
        ", ".join(other[:3]), ", ".join(IMAGE_EXTENSIONS))
  if paths and empty:
    raise DataNotFoundError(
        f"Image folder {root!r} has {len(empty)} class folder(s) without an "
        f"image file: {empty[:5]}. Each class folder takes a label, so an "
        "empty one shifts every later class by one. Put its images in it or "
        f"remove it (image suffixes: {', '.join(IMAGE_EXTENSIONS)}).")
  if not paths:
    raise DataNotFoundError(
        f"Image folder {root!r} has class folders {list(classes)[:5]}... but "
        "no images in them (looked for the suffixes PIL decodes: "
        f"{', '.join(IMAGE_EXTENSIONS)}).")
  return paths, np.asarray(labels, np.int32)


class ImageFolderSource:
  """``root/<class_name>/**/*.<IMAGE_EXTENSIONS>`` (any case) as records.

  ``class_names`` fixes the label order (pass the training split's classes to
  the evaluation split so the labels agree); default: sorted sub-folders.
  ``source[i]`` -> ``{"path": str, "label": int32}``.
  """

  def __init__(self, root: str, class_names: tuple[str, ...] | None = None):
    self.root = root
    self.class_names = tuple(class_names or list_classes(root))
    unknown = set(list_classes(root)) - set(self.class_names)
    if unknown:
      raise DataConfigError(
          f"Image folder {root!r} has classes {sorted(unknown)[:5]} that the "
          "training split does not have; labels would disagree. Make both "
          "splits use the same class folders.")
    self.paths, self.labels = list_images(root, self.class_names)

  def __len__(self) -> int:
    return len(self.paths)

  def __getitem__(self, index):
    index = int(index)
    return {"path": self.paths[index], "label": self.labels[index]}

  def __repr__(self):
    return (f"ImageFolderSource(root={self.root!r}, classes="
            f"{len(self.class_names)}, images={len(self.paths)})")


def fingerprint(source) -> dict:
  """What ``source`` holds, to compare across processes and runs: its size
  and, for an image folder, a SHA-256 of its files' paths (relative to the
  split's folder) and labels, so images added, removed or renamed (or a
  class folder missing, which shifts the labels after it) change it; files
  edited in place do not. About 1 s for 1.28M paths."""
  out = {"count": len(source)}
  if isinstance(source, ImageFolderSource):
    digest, cut = hashlib.sha256(), len(os.path.join(source.root, ""))
    for path, label in zip(source.paths, source.labels):
      # surrogateescape: a name that is not UTF-8 (an old Latin-1 zip) as
      # its bytes on disk.
      digest.update(f"{path[cut:]}\t{label}\n".encode("utf-8",
                                                       "surrogateescape"))
    out["files_sha256"] = digest.hexdigest()
  return out


# --- TFDS ------------------------------------------------------------------------

def _tfds_howto(name: str, data_dir, setting: str = "config.data") -> str:
  # Not `tfds build`: its command line imports Apache Beam (not installed).
  where = data_dir or "<data_dir>"
  manual = ("; for imagenet2012 put ILSVRC2012_img_train.tar and "
            "ILSVRC2012_img_val.tar in --manual_dir") if "imagenet" in name else ""
  return (f"Prepare it in ArrayRecord format first: `python -m "
          f"genvis_jax.data.prepare_tfds --name={name} --data_dir={where} "
          f"--manual_dir=<dir with the downloaded files>`{manual}. Then set "
          f"{setting}.path to that data_dir.")


class TfdsSource:
  """A prepared TFDS data set read with ``tfds.data_source`` (ArrayRecord).

  Never downloads or prepares anything: a missing or non-ArrayRecord data set
  raises ``DataNotFoundError`` naming the data set, ``data_dir`` and the
  ``tfds build`` command. ``source[i]`` -> ``{"image": uint8, "label": int32}``.
  """

  def __init__(self, name: str, split: str, data_dir: str | None = None,
               setting: str = "config.data"):
    """``setting``: the config section naming the data set (messages)."""
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
    file_format = str(builder.info.file_format)
    if "array_record" not in file_format.lower():
      raise DataNotFoundError(
          f"TFDS data set {name!r} in {builder.data_dir} is stored as "
          f"{file_format}, but random access needs ArrayRecord. "
          f"{_tfds_howto(name, self.data_dir, setting)}")
    try:   # a split, or TFDS's slices and sums of them ("train[:5%]")
      builder.info.splits[split]   # pylint: disable=pointless-statement
    except (KeyError, ValueError, AssertionError) as e:
      raise DataConfigError(f"TFDS data set {name!r} has no split {split!r}; it has "
                       f"{list(builder.info.splits)} (and TFDS slices of them, "
                       f"e.g. 'train[:5%]'). Set {setting}.split / "
                       "eval_split.") from e
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
    self._source = tfds.data_source(name, split=split, data_dir=self.data_dir,
                                    download=False)

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index):
    record = self._source[int(index)]
    image = to_rgb(record["image"], f"TFDS data set {self.name!r}")
    return {"image": image,
            "label": np.int32(record["label"] if self.labelled else 0)}

  def __repr__(self):
    return f"TfdsSource({self.name!r}, split={self.split!r}, n={len(self)})"


def to_rgb(image, where: str = "an image data set") -> np.ndarray:
  """(H, W) or (H, W, C) with C in 1..4 -> (H, W, 3), as PIL's
  ``convert("RGB")`` does in the official loaders (torchvision ``pil_loader``):
  grey (``L``) and grey + alpha (``LA``) repeat the grey value, RGBA drops its
  alpha without compositing it onto any background. 16-bit values keep their
  high byte (``v >> 8``), as image folders' 16-bit files do
  (``transforms._to_8bit_rgb``, PIL's own 16-bit RGB decode); the result is
  uint8.

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
