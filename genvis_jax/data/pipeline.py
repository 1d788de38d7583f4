"""Grain input pipeline: source -> shard -> shuffle/repeat -> per-record
transforms -> batch -> (worker processes) -> float conversion -> prefetch
(one pass, not training: the workers before the batching, keeping the order).

``create_dataset`` returns a grain ``DatasetIterator`` of process-local batches
(numpy) and a ``PipelineInfo``. Determinism: the order depends only on the
seed, the process index/count and (training) ``num_workers``; every random
augmentation draws from grain's per-record generator, so a restored iterator
(``get_state`` / ``set_state``, or ``grain.checkpoint.CheckpointSave/Restore``
inside an Orbax ``CheckpointManager``) yields exactly the batches an
uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import threading
import time
from typing import Any

from absl import flags
from absl import logging
import grain
import numpy as np

from genvis_jax.data import (demo, skips, sources, tfds_source, token_origin,
                             tokens, transforms)

SOURCES = sources.SOURCES


def _exit_with_parent(parent_pid: int, *_worker) -> None:
  """A grain worker's init: a daemon thread ends the worker once the process
  that started it is gone. kill -9 (an OOM kill, a scheduler) runs no
  cleanup, and grain's workers loop until told to stop: they stayed, 214 MB
  and a few % of a core each, one set per kill. PyTorch's DataLoader
  workers watch their parent the same way (its ``ManagerWatchdog``)."""
  def watch():
    while os.getppid() == parent_pid:
      time.sleep(1.0)
    os._exit(0)
  threading.Thread(target=watch, name="exit_with_parent", daemon=True).start()


def _worker_processes(it_ds, num_workers: int, prefetch: int):
  """``it_ds`` run in ``num_workers`` grain worker processes (0: in this one),
  each ending with this process (``_exit_with_parent``)."""
  if num_workers <= 0:
    return it_ds
  # grain's workers read absl flags; outside absl.app (tests, colabs) use
  # their defaults instead of failing in the worker.
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  return it_ds.mp_prefetch(
      grain.MultiprocessingOptions(num_workers=num_workers,
                                   per_worker_buffer_size=max(prefetch, 1)),
      worker_init_fn=functools.partial(_exit_with_parent, os.getpid()))


# --- sources ---------------------------------------------------------------------

def make_source(data_config, split: str, setting: str = "config.data",
                check_labels: bool = False):
  """The random-access source for ``split``; raises now if its data is missing
  (naming ``setting``, the config section ``data_config`` is).
  ``check_labels``: see ``create_dataset``.

  Returns ``(source, num_classes or None, class_names or None)``.
  """
  kind, path = data_config.source, data_config.path
  if kind in ("demo", "demo_landscapes"):
    src = demo.DemoSource(split, kind="shapes" if kind == "demo" else
                          "landscapes",
                          num_examples=data_config.get("num_examples") or None)
    return src, len(src.class_names), src.class_names
  if kind == "image_folder":
    # Labels come from the training split's folders so all splits agree.
    classes = sources.list_classes(
        sources.resolve_split_dir(path, data_config.split, setting,
                                  train_split=data_config.split))
    src = sources.ImageFolderSource(sources.resolve_split_dir(
        path, split, setting, train_split=data_config.split), classes,
        data_config.get("extensions", "torchvision"))
    return src, len(classes), classes
  if kind == "tfds":
    # The key holding ``split``, named if TFDS has no such split.
    key = ("split" if split == data_config.split else "eval_split"
           if split == data_config.get("eval_split") else "split / eval_split")
    src = tfds_source.TfdsSource(data_config.name, split, path or None, setting,
                                 split_key=key,
                                 label_limit=data_config.get("num_classes")
                                 if check_labels else None)
    return src, src.num_classes, None
  if kind == "tokens":
    # A "{split}" in the pattern selects per-split files.
    pattern = path.replace("{split}", split)
    return (tokens.TokenSource(pattern),
            token_origin.recorded_num_classes(pattern), None)
  raise sources.DataConfigError(
      f"Unknown {setting}.source {kind!r}; choose one of {SOURCES}.")


# --- per-example crops ----------------------------------------------------------

class _OneCropOfImage(grain.transforms.RandomMap):
  """Image index -> one of its ``crops`` consecutive records, drawn anew for
  every visit (the key of a repeated dataset's element includes its epoch)."""

  def __init__(self, source, crops: int):
    self.source, self.crops = source, crops

  def random_map(self, image, rng: np.random.Generator):
    return self.source[int(image) * self.crops + int(rng.integers(self.crops))]


CROPS_PER_EPOCH = ("all", "one")


def _crops_per_example(data_config, split: str, train: bool,
                       setting: str) -> int:
  """Records one training example draws from: 1 (``crops_per_epoch="all"``,
  every record is an example) or each image's ten crops (``"one"``, checked
  against the token files' pretokenize records). Raises ``DataConfigError``
  for an unknown setting or one a source without crop records cannot take,
  ``TokenFileError`` for files without ten consecutive crops per image."""
  how = data_config.get("crops_per_epoch", "all")
  if how not in CROPS_PER_EPOCH:
    raise sources.DataConfigError(
        f"{setting}.crops_per_epoch={how!r}; use one of {CROPS_PER_EPOCH}.")
  if how == "all" or not train:
    return 1
  if data_config.source != "tokens":
    raise sources.DataConfigError(
        f"{setting}.crops_per_epoch='one' draws one of each image's "
        "pre-tokenized crops per epoch (source 'tokens'); "
        f"{data_config.source!r} images are cropped afresh at every visit: "
        f"set {setting}.crops_per_epoch=all.")
  return token_origin.crops_per_image(data_config.path.replace("{split}", split))


class _FinalizeBatch(grain.transforms.Map):
  """Plain numpy leaves (not worker shared-memory views); image -> float32."""

  def __init__(self, value_range, formula: str = "torchvision"):
    self.to_float = value_range and transforms.ToFloat(value_range, formula)

  def map(self, batch):
    batch = {k: np.asarray(v) for k, v in batch.items()}
    return self.to_float.map(batch) if self.to_float else batch


# --- pipeline --------------------------------------------------------------------

@dataclasses.dataclass
class PipelineInfo:
  """What the trainer needs to know about a pipeline (also readable as a dict)."""
  source: str
  split: str
  num_examples: int               # in the split, all processes together
  num_examples_per_process: int   # this process's shard
  num_classes: int                # the data's own count where known, else
                                  # config.data.num_classes
  local_batch_size: int
  steps_per_epoch: int            # batches per pass over this process's shard
                                  # (>= 1 when training; see _steps_per_epoch)
  class_names: tuple[str, ...] | None = None
  token_shape: tuple[int, ...] | None = None
  # Whether num_classes is the data's own (demo, image folders, TFDS class
  # labels, token files recording their labels): config.data.num_classes
  # cannot lower it.
  classes_from_data: bool = False
  iterator: Any = dataclasses.field(default=None, repr=False)
  data_source: Any = dataclasses.field(default=None, repr=False)
  _memo: dict = dataclasses.field(default_factory=dict, repr=False,
                                  compare=False)

  def fingerprint(self) -> dict:
    """``sources.fingerprint`` of the split read (its size, an image
    folder's files and labels); computed once."""
    if "fingerprint" not in self._memo:
      self._memo["fingerprint"] = sources.fingerprint(self.data_source)
    return self._memo["fingerprint"]

  def listing(self) -> dict | None:
    """What the data is, saved with each input position so that a resume
    can compare (``train.resume.listing_changed``): an image folder's
    ``fingerprint`` and ``classes`` (the class names in label order), a TFDS
    split's size and the data set's ``tfds`` name and version (prepared
    again, it may hold other records). None for other sources (token files
    are compared by ``data.run_origin``)."""
    found = self.fingerprint()
    if self.source == "tfds":
      return {**found, "tfds": self.data_source.release}
    if self.class_names is None or "files_sha256" not in found:
      return None
    return {**found, "classes": list(self.class_names)}

  @property
  def may_skip(self) -> bool:
    """Whether records of this data may turn out unreadable and be skipped
    (an image folder's files, TFDS records that do not decode)."""
    return self.source in ("image_folder", "tfds")

  @property
  def num_skipped(self) -> int:
    """Distinct unreadable files skipped by this process (all workers) in the
    batches consumed so far; a file skipped again in a later epoch counts once.

    Kept in the iterator state, so it survives checkpoint restores.
    """
    if self.iterator is None:
      return 0
    return len(skips.skipped_files(self.iterator.get_state()))

  def __getitem__(self, key):
    return getattr(self, key)


def _process_index_count(process_index, process_count):
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count}).")
  return process_index, process_count


def _image_transforms(ds, data_config, train, aug_seeds, setting):
  """Crop / flip; skip markers of unreadable files pass through untouched.
  ``setting``: the config section ``data_config`` is, for the messages."""
  size = data_config.image_size
  width = data_config.get("image_width", 0) or size
  if train and data_config.random_crop:
    crop = transforms.RandomCrop(
        size, width, data_config.get("crop_min_frac", 1.0),
        method=data_config.get("random_crop_method", "adm"), setting=setting)
    ds = ds.random_map(skips.PassSkippedRandom(crop), seed=aug_seeds[0])
  else:
    method = data_config.get("center_crop", "") or "adm"
    ds = ds.map(skips.PassSkipped(transforms.CenterCrop(
        size, width, method, setting=f"{setting}.center_crop")))
  if train and data_config.random_flip:
    ds = ds.random_map(skips.PassSkippedRandom(transforms.RandomFlip()),
                       seed=aug_seeds[1])
  return ds


def create_dataset(data_config, *, split: str, global_batch_size: int,
                   seed: int, train: bool = True, process_index=None,
                   process_count=None, value_range=(0.0, 1.0),
                   drop_remainder: bool = True, setting: str = "config.data",
                   batch_setting: str = "config.train.global_batch_size",
                   check_labels: bool = False):
  """Builds the input pipeline of ``split`` for this process.

  Args:
    data_config: ``config.data`` (source, name, path, image_size, ...).
    split: e.g. ``config.data.split`` or ``config.data.eval_split``.
    global_batch_size: batch over all processes; must divide by process_count.
    seed: shuffle / augmentation seed.
    train: shuffle, repeat forever (reshuffled every epoch), random crop/flip.
      Otherwise one pass in order with centre crops.
    process_index, process_count: default ``jax.process_index/count()``.
    value_range: float range of the images, (0, 1) or (-1, 1).
    drop_remainder: drop the last partial batch and the ``n % process_count``
      examples that would make the shards unequal (keep both for
      pre-tokenizing, which has no collective per batch).
    setting: the config section ``data_config`` is, for the messages (e.g.
      ``config.pretokenize.data``).
    batch_setting: the config key ``global_batch_size`` comes from, named
      when it does not split across the processes.
    check_labels: the labels index a model's classes (a class-conditional
      model's training): a TFDS label without a class count (not a
      ``ClassLabel``) at or past ``data_config.num_classes`` raises
      ``DataConfigError`` as it is read.

  Returns:
    ``(iterator, info)``: a grain ``DatasetIterator`` yielding process-local
    batches ``{"image": float32 (b, H, W, 3), "label": int32 (b,)}`` (token
    sources: ``{"tokens": int32 (b, *token_shape), "label": int32 (b,)}``)
    with ``b = global_batch_size // process_count``; and a ``PipelineInfo``.
  """
  pi, pc = _process_index_count(process_index, process_count)
  if global_batch_size <= 0 or global_batch_size % pc:
    raise sources.DataConfigError(
        f"Global batch size {global_batch_size} must be a positive multiple of "
        f"the process count {pc}; change {batch_setting}.")
  if len(value_range) != 2:
    raise ValueError(f"value_range must be (lo, hi), got {value_range!r}.")
  local_batch = global_batch_size // pc
  seed = int(seed) & 0xFFFFFFFF          # grain seeds are uint32
  source, num_classes, class_names = make_source(data_config, split, setting,
                                                 check_labels)
  classes_from_data = num_classes is not None
  num_classes = _check_classes(num_classes, data_config, setting)

  # crops_per_epoch="one": an example is an image, whose pre-tokenized crops
  # are consecutive records (LlamaGen / FQGAN's CustomDataset draws one of
  # them at each visit).
  crops = _crops_per_example(data_config, split, train, setting)
  n = len(source) // crops
  # Equal shards where every batch is a collective step (no process waits);
  # a pass that keeps every example (pre-tokenizing) keeps the remainder
  # too: the first n % pc processes then hold one example more.
  stop = n - n % pc if drop_remainder else n
  ds = (grain.MapDataset.source(source) if crops == 1 else
        grain.MapDataset.range(n))[pi:stop:pc]
  shard = len(ds)
  if not shard:
    # Training would repeat an empty shard (its first next() raised a bare
    # StopIteration); a one-pass reader would yield nothing.
    raise sources.DataConfigError(
        f"Split {split!r} of {data_config.source!r} has {n} example(s) for "
        f"{pc} processes: process {pi}'s shard is empty (each process reads "
        f"its own examples). Run on at most {n} process(es), or use a split "
        f"of at least {pc} examples ({setting}.path / {setting}.split).")
  if shard < local_batch and not train and drop_remainder:
    raise sources.DataConfigError(
        f"Split {split!r} of {data_config.source!r} has {n} examples, "
        f"{shard} per process: fewer than one local batch of {local_batch}. "
        "Lower the batch size or use a bigger split.")
  if shard < local_batch and train:
    # Repeated and reshuffled, the shard still fills batches: each holds
    # its examples more than once (with other random crops / flips).
    logging.warning(
        "Split %r of %r: this process's shard has %d example(s), fewer than "
        "one local batch of %d (global batch %d over %d processes): every "
        "batch holds the same examples several times. Fine for a smoke "
        "test; for real training lower config.train.global_batch_size or "
        "use more data.", split, data_config.source, shard, local_batch,
        global_batch_size, pc)
  # Per-process seeds: the shards interleave (process p holds examples p,
  # p + pc, ...), so one shuffle seed everywhere would put neighbouring
  # examples (the ten crops of one image, one class of an image folder) in
  # the same row of every process's batch.
  *aug_seeds, shuffle_seed = (
      int(s) for s in np.random.SeedSequence([seed, pi]).generate_state(3))
  if train:
    ds = ds.shuffle(seed=shuffle_seed).repeat(None)
  if crops > 1:
    ds = ds.random_map(_OneCropOfImage(source, crops), seed=aug_seeds[1])
  is_tokens = data_config.source == "tokens"
  if not is_tokens:
    if data_config.source == "image_folder":
      # Default False: pixels as stored, the official loaders' (and TFDS's)
      # reading; True applies the EXIF orientation first.
      ds = ds.map(transforms.DecodeImage(
          exif_transpose=bool(data_config.get("exif_transpose", False))))
    ds = _image_transforms(ds, data_config, train, aug_seeds, setting)

  threads = data_config.get("read_threads", 16)
  prefetch = data_config.prefetch
  it_ds = ds.to_iter_dataset(
      grain.ReadOptions(num_threads=threads,
                        prefetch_buffer_size=max(2 * local_batch, threads)),
      allow_nones=True)
  skipped = functools.partial(skips.SkipIterDataset, limit=2 * shard,
                              where=f"{data_config.path} (split {split!r})")
  if train:
    # Workers batch (grain's way: one transfer per batch). Each worker
    # reads every num_workers-th record of the endless stream, so the
    # batches differ from those of 0 workers.
    it_ds = skipped(it_ds).batch(local_batch, drop_remainder=drop_remainder)
    it_ds = _worker_processes(it_ds, data_config.num_workers, prefetch)
  else:
    # One pass in order: workers hand over records (unreadable files' skip
    # markers too), interleaved back into the source order, and the markers
    # are dropped and batches formed here. Batched in the workers, the first
    # num_images were every num_workers-th image and each worker dropped its
    # own remainder; a worker dropping markers itself ran ahead of the others.
    it_ds = _worker_processes(it_ds, data_config.num_workers, prefetch)
    it_ds = skipped(it_ds).batch(local_batch, drop_remainder=drop_remainder)
  # uint8 crosses process boundaries; float only at the end.
  formula = data_config.get("to_float", "torchvision")
  if formula not in transforms.TO_FLOAT:
    raise sources.DataConfigError(
        f"{setting}.to_float={formula!r}; one of {transforms.TO_FLOAT}.")
  it_ds = it_ds.map(_FinalizeBatch(None if is_tokens else value_range,
                                   formula))
  if prefetch > 0:
    it_ds = grain.experimental.ThreadPrefetchIterDataset(
        it_ds, prefetch_buffer_size=prefetch)
  it_ds = skips.EpochLogIterDataset(it_ds, shard, split)
  iterator = iter(it_ds)
  info = PipelineInfo(
      source=data_config.source, split=split, num_examples=n,
      num_examples_per_process=shard, num_classes=num_classes,
      local_batch_size=local_batch,
      steps_per_epoch=_steps_per_epoch(shard, local_batch, train,
                                       drop_remainder),
      class_names=class_names, iterator=iterator, data_source=source,
      classes_from_data=classes_from_data,
      token_shape=source.token_shape if is_tokens else None)
  logging.info("Input pipeline: %s", info)
  return iterator, info


def _steps_per_epoch(shard: int, local_batch: int, train: bool,
                     drop_remainder: bool) -> int:
  """Batches per pass over a shard: whole batches (``drop_remainder``), else
  counting the last partial one; at least 1 when training (a shard smaller
  than a batch repeats within each batch, so one batch spans a pass)."""
  if train:
    return max(1, shard // local_batch)
  return shard // local_batch if drop_remainder else -(-shard // local_batch)


def _check_classes(num_classes, data_config, setting: str) -> int:
  configured = data_config.num_classes
  if num_classes is None:
    return configured
  if num_classes > configured:
    # Pre-tokenizing runs a generator's config, which has both sections; a
    # config reading images (a tokenizer's) may have neither.
    if setting == "config.pretokenize.data":
      later = ("the generator trained on these tokens needs the same: "
               f"--config.data.num_classes={num_classes} --config.model."
               f"num_classes={num_classes}")
    elif data_config.source == "tokens":   # a generator's own training data
      later = f"and its class embedding: --config.model.num_classes={num_classes}"
    else:
      later = ("the jobs that read these classes later (pre-tokenizing, the "
               "generator) need the same num_classes in their configs' data "
               "and model sections")
    raise sources.DataConfigError(
        f"The {data_config.source!r} data has {num_classes} classes but "
        f"{setting}.num_classes is {configured}: labels would overflow the "
        f"class embedding. Set --{setting}.num_classes={num_classes}; "
        f"{later}.")
  return num_classes
