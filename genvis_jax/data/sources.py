"""Random-access data sources: an image folder (TFDS: ``tfds_source.py``).

Every source is a grain ``RandomAccessDataSource`` (``__len__``,
``__getitem__``) that checks its files when it is built, so a wrong path fails
before any compile, with a message that says how to fix it. Records:

* ``ImageFolderSource``: ``{"path": str, "label": int32}`` (decoded lazily by
  ``transforms.DecodeImage``; the pipeline skips unreadable files and counts
  them);
* ``tfds_source.TfdsSource``: ``{"image": uint8 (H, W, 3), "label": int32,
  "path": "<name>/<split>[<index>]"}`` (a record that does not decode: a skip
  marker, as an unreadable file's).

The demo source lives in ``demo.py``, the token files source in ``tokens.py``;
this module also holds the errors and checks every source shares.
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
# torchvision's IMG_EXTENSIONS: what ImageFolder lists, as the official RAR,
# LlamaGen / FQGAN and Equivariant loaders do.
TORCHVISION_EXTENSIONS = (".bmp", ".jpeg", ".jpg", ".pgm", ".png", ".ppm",
                          ".tif", ".tiff", ".webp")
# config.data.extensions -> the suffixes an image folder lists.
EXTENSIONS = {"torchvision": TORCHVISION_EXTENSIONS, "pil": IMAGE_EXTENSIONS}


class DataNotFoundError(UserError, FileNotFoundError):
  """A data set is missing, empty or not prepared; the message says how to fix it."""


class DataConfigError(UserError, ValueError):
  """``config.data`` does not fit the data (split, classes, batch, source kind)."""


# Every config.data.source; all but "tokens" (pre-tokenized codes) give images.
SOURCES = ("demo", "demo_landscapes", "image_folder", "tfds", "tokens")
IMAGE_SOURCES = tuple(s for s in SOURCES if s != "tokens")
# config.data keys that one kind of source alone reads: the image reading and
# augmentation (token files hold codes of crops made when pre-tokenizing), and
# the token files' own (``modes.check_overrides`` refuses them on the command
# line for the other kind).
IMAGE_ONLY_KEYS = ("center_crop", "crop_min_frac", "exif_transpose",
                   "extensions", "random_crop", "random_crop_method",
                   "random_flip", "to_float")
TOKEN_ONLY_KEYS = ("crops_per_epoch", "verify_checksums")
# ... and those one image source alone reads: an image folder's file
# settings (a TFDS data set holds decoded records) and TFDS's data set name.
ONE_SOURCE_KEYS = {"image_folder": ("exif_transpose", "extensions"),
                   "tfds": ("name",)}
# What each source reads, in words (messages).
SOURCE_WORDS = {"demo": "the demo images", "demo_landscapes": "the demo "
                "landscapes", "image_folder": "image folders", "tfds": "TFDS "
                "data sets", "tokens": "token files"}


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
  folder, note = _resolve_split_dir(path, split, setting, train_split)
  if note:
    logging.warning("%s.", note)
  return folder


def held_out_note(path: str, split: str, setting: str = "config.data",
                  train_split: str = "train") -> str:
  """Why ``split`` of image folder ``path`` is not held out from
  ``train_split`` (it reads the training images), or "" where it is: a
  caveat of metrics measured on it. Raises as ``resolve_split_dir``."""
  return _resolve_split_dir(path, split, setting, train_split)[1]


def _resolve_split_dir(path: str, split: str, setting: str,
                       train_split: str) -> tuple[str, str]:
  """``resolve_split_dir``'s folder and ``held_out_note``."""
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
    if split == train_split:
      return path, ""
    return path, (
        f"Image folder {path!r} holds class folders only: split {split!r} "
        "reads the same images as training, so its metrics are not held-out "
        f"ones. For held-out images use {path}/train/<class_name>/ and "
        f"{path}/val/<class_name>/")
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
    return found, ""
  train = folder(train_split)
  if train is None:
    raise DataNotFoundError(
        f"Image folder {path!r} ({setting}.path) holds split folders "
        f"{splits} but none for the training split {train_split!r}: put its "
        f"class folders in {os.path.join(path, train_split)}/.")
  name = "val" if split == "validation" else split
  return train, (
      f"Image folder {path!r} has no {name!r} folder: split {split!r} reads "
      f"the training split's images ({train}), so its metrics are not "
      "held-out ones. Put held-out images under "
      f"{os.path.join(path, name)}/<class_name>/ to evaluate on them")


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


def _walk_images(class_dir: str,
                 suffixes: tuple[str, ...]) -> tuple[list[str], list[str]]:
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
      (found if f.lower().endswith(suffixes) else other).append(
          os.path.join(dirpath, f))
  return sorted(found), sorted(other)


def list_images(root: str, classes: tuple[str, ...],
                extensions: str = "torchvision") -> tuple[list[str], np.ndarray]:
  """Sorted image paths under ``root/<class>/`` (recursive, following
  symbolic links to folders) and int32 labels: files with the suffixes of
  ``EXTENSIONS[extensions]`` (torchvision's by default, as the official
  loaders list; "pil": every format PIL decodes), any case.

  Raises:
    DataNotFoundError: no image at all, or a class folder without an image
      file (it would take a label and shift every later class by one;
      torchvision's ``ImageFolder`` refuses it too). A class folder a split
      does not have is allowed (an evaluation split may lack classes).
  """
  suffixes = EXTENSIONS[extensions]
  paths, labels, empty, other = [], [], [], []
  for label, name in enumerate(classes):
    class_dir = os.path.join(root, name)
    if not os.path.isdir(class_dir):
      continue  # a split may lack a class of the training split
    found, not_images = _walk_images(class_dir, suffixes)
    if not found:
      empty.append(name)
    paths += found
    other += not_images
    labels += [label] * len(found)
  if other:   # as torchvision's ImageFolder, by suffix; said, not silent
    decodable = [f for f in other if f.lower().endswith(IMAGE_EXTENSIONS)]
    logging.warning(
        "Image folder %r: %d file(s) without an image suffix are not listed, "
        "e.g. %s (suffixes read: %s).%s", root, len(other),
        ", ".join(other[:3]), ", ".join(suffixes),
        f" {len(decodable)} of them are images of other formats (e.g. "
        f"{decodable[0]}), which the official loaders leave out too: "
        "config.data.extensions=pil reads them." if decodable else "")
  if paths and empty:
    raise DataNotFoundError(
        f"Image folder {root!r} has {len(empty)} class folder(s) without an "
        f"image file: {empty[:5]}. Each class folder takes a label, so an "
        "empty one shifts every later class by one. Put its images in it or "
        f"remove it (image suffixes: {', '.join(suffixes)}).")
  if not paths:
    raise DataNotFoundError(
        f"Image folder {root!r} has class folders {list(classes)[:5]}... but "
        f"no images in them (looked for the suffixes {', '.join(suffixes)}"
        f"{'' if extensions == 'pil' else '; config.data.extensions=pil reads every format PIL decodes'}).")
  return paths, np.asarray(labels, np.int32)


class ImageFolderSource:
  """``root/<class_name>/**/*.<suffix>`` (any case; ``list_images``'s
  ``extensions``) as records.

  ``class_names`` fixes the label order (pass the training split's classes to
  the evaluation split so the labels agree); default: sorted sub-folders.
  ``source[i]`` -> ``{"path": str, "label": int32}``.
  """

  def __init__(self, root: str, class_names: tuple[str, ...] | None = None,
               extensions: str = "torchvision"):
    if extensions not in EXTENSIONS:
      raise DataConfigError(
          f"config.data.extensions={extensions!r}; one of {sorted(EXTENSIONS)} "
          "(torchvision's ImageFolder suffixes, or every format PIL decodes).")
    self.root = root
    self.class_names = tuple(class_names or list_classes(root))
    unknown = set(list_classes(root)) - set(self.class_names)
    if unknown:
      raise DataConfigError(
          f"Image folder {root!r} has classes {sorted(unknown)[:5]} that the "
          "training split does not have; labels would disagree. Make both "
          "splits use the same class folders.")
    self.paths, self.labels = list_images(root, self.class_names, extensions)

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
