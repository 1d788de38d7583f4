"""Training input throughput per host: images/s the Grain pipeline of a
config delivers from JPEG files, by worker count.

A training step consumes ``global_batch / process_count`` images per host;
a host that decodes, resizes and crops fewer images per second than its
chips consume starves them. This times the config's own training pipeline
(``data.create_dataset``: its crop method, flips, value range, image size)
on an image folder of synthetic JPEGs sized like ImageNet's (500x375 by
default: the resize and crop cost scales with it), after every worker has
delivered its first batch (workers starting, the folder listed). Token pipelines (RAR / FAR training
on pre-tokenized files) read a few KB per example and are not timed here.

  python bench/bench_input.py --config=configs/eq_l.py --batch=256 --workers=0,2,4
  python bench/bench_input.py --config=configs/eq_tokenizer.py --batch=64 --batches=5

The table gives images/s per host; divide the per-host batch by it for the
seconds of input per step, to hold against the step time measured on the
chips (``bench/accelerator.py``'s train section).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

# Run as a script from anywhere: the repository root is where ``bench`` lives.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from bench import plan_memory  # noqa: E402  (load_config)
from bench.accel_harness import commit_id  # noqa: E402


def write_folder(root: str, num_images: int, width: int, height: int,
                 num_classes: int, seed: int = 0) -> None:
  """``num_images`` JPEGs (quality 90) in ``num_classes`` class folders:
  smooth colour ramps plus noise, compressing about as photographs do (pure
  noise decodes slower than any photo)."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
  for i in range(num_images):
    folder = os.path.join(root, f"class_{i % num_classes:03d}")
    os.makedirs(folder, exist_ok=True)
    a, b, c = rng.uniform(0.2, 1.0, 3)
    ramp = np.stack([a * xx / width, b * yy / height,
                     c * (xx + yy) / (width + height)], -1) * 255
    img = ramp + rng.normal(0, 12, ramp.shape)
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(
        os.path.join(folder, f"{i:05d}.jpg"), quality=90)


def time_pipeline(data_config, batch: int, batches: int, value_range):
  """(seconds until every worker has delivered a batch, seconds per later
  batch) of the training pipeline of ``data_config`` at a per-host
  ``batch``. Grain starts its workers one at a time, as the interleave
  first asks each for a batch (about 1.5 s each here): timed, those starts
  made more workers look slower."""
  from genvis_jax import data as data_lib  # pylint: disable=import-outside-toplevel
  t0 = time.perf_counter()
  it, _ = data_lib.create_dataset(
      data_config, split="train", global_batch_size=batch, seed=0,
      train=True, process_index=0, process_count=1, value_range=value_range)
  for _ in range(max(data_config.num_workers, 1)):
    next(it)
  first = time.perf_counter() - t0
  t0 = time.perf_counter()
  for _ in range(batches):
    next(it)
  each = (time.perf_counter() - t0) / batches
  close = getattr(it, "close", None)
  if close:
    close()
  return first, each


def main(argv=None):
  p = argparse.ArgumentParser(
      description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--config", required=True,
                 help="a training config reading images, e.g. configs/eq_l.py")
  p.add_argument("--batch", type=int, default=64, help="images per host batch")
  p.add_argument("--batches", type=int, default=10, help="timed batches")
  p.add_argument("--workers", default="0,2", help="comma-separated counts")
  p.add_argument("--images", type=int, default=512, help="JPEGs in the folder")
  p.add_argument("--image_shape", default="500x375", help="WxH of each JPEG")
  args = p.parse_args(argv)
  width, height = (int(v) for v in args.image_shape.split("x"))
  workers = [int(w) for w in args.workers.split(",")]
  if args.batch < 1 or args.batches < 1 or min(workers) < 0:
    p.error("--batch and --batches must be at least 1, --workers at least 0")
  config = plan_memory.load_config(args.config)
  if config.data.get("source") == "tokens":
    p.error(f"{args.config} trains on token files; pass a config that reads "
            "images (a tokenizer's, or an Equivariant generator's)")
  from genvis_jax import models  # pylint: disable=import-outside-toplevel
  value_range = (models.value_range(config.tokenizer.model)
                 if "tokenizer" in config and config.tokenizer.get("model")
                 else models.value_range(config.model))
  root = tempfile.mkdtemp(prefix="bench_input_")
  try:
    write_folder(root, args.images, width, height, num_classes=10)
    print(f"# {args.config}: {config.data.image_size} px, crops "
          f"{config.data.get('random_crop_method', '') or 'adm'}, "
          f"{args.images} JPEGs of {width}x{height}, per-host batch "
          f"{args.batch}, {os.cpu_count()} cpus | commit {commit_id()}",
          flush=True)
    print("| workers | start s | ms / batch | images/s |")
    print("|---|---|---|---|")
    for w in workers:
      d = config.data.copy_and_resolve_references()
      d.source, d.path, d.num_classes, d.num_workers = "image_folder", root, 10, w
      first, each = time_pipeline(d, args.batch, args.batches, value_range)
      print(f"| {w} | {first:.1f} | {1e3 * each:.0f} | "
            f"{args.batch / each:.0f} |", flush=True)
  finally:
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
  main()
