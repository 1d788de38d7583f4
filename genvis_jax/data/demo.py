"""Embedded demo data sets, generated procedurally from a seed (no download).

* ``demo_shapes``: 32x32 RGB images of 10 classes (five shapes, five textures)
  with random colours, position, scale, rotation and a little noise. A small
  CNN separates them, but circle / ring / dots and the three stripe directions
  are not trivially separable by colour statistics.
* ``demo_landscapes``: 32x64 layered "landscapes" (sky, mountain ridges, ground)
  whose statistics do not depend on the column (random phases, features placed
  uniformly in x), for the equivariant column tokenizer. Classes are palettes.

Both are vectorised numpy (2-3 s for 10k images on a 2-core VM, once per
process for each setting) and bit-identical for a seed.
``DemoSource`` wraps them as a grain ``RandomAccessDataSource``.
"""

from __future__ import annotations

import functools

import numpy as np

SHAPE_CLASSES = ("circle", "square", "triangle", "cross", "ring",
                 "horizontal_stripes", "vertical_stripes", "checkerboard",
                 "diagonal_stripes", "dots")
LANDSCAPE_CLASSES = ("day", "sunset", "night", "snow", "desert")
KINDS = {"shapes": SHAPE_CLASSES, "landscapes": LANDSCAPE_CLASSES}
SPLITS = {"train": 0, "validation": 1, "val": 1, "test": 2}
DEFAULT_SIZES = {"train": 10_000, "validation": 1_000, "val": 1_000,
                 "test": 1_000}


def _balanced_labels(rng, n, num_classes):
  return rng.permutation(np.arange(n) % num_classes).astype(np.int32)


def _soft(sdf):
  """Signed distance (pixels, < 0 inside) -> anti-aliased coverage in [0, 1]."""
  return np.clip(0.5 - sdf, 0.0, 1.0)


def _wave(t):
  """Soft square wave of phase ``t`` (cycles) -> coverage in [0, 1]."""
  return np.clip(0.5 + 2.0 * np.sin(2 * np.pi * t), 0.0, 1.0)


def _shape_alpha(c, x, y, p):
  """Coverage (m, S, S) of class ``c`` for per-sample params ``p`` (m, 1, 1)."""
  dx, dy = x - p["cx"], y - p["cy"]
  ca, sa = np.cos(p["angle"]), np.sin(p["angle"])
  u, v = ca * dx + sa * dy, -sa * dx + ca * dy   # rotated object frame
  r = p["r"]
  name = SHAPE_CLASSES[c]
  if name == "circle":
    return _soft(np.hypot(dx, dy) - r)
  if name == "square":
    return _soft(np.maximum(np.abs(u), np.abs(v)) - 0.8 * r)
  if name == "triangle":  # equilateral, circumradius 1.15 r
    k = p["angle"] + 2 * np.pi * np.arange(3).reshape(3, 1, 1, 1) / 3
    faces = np.cos(k) * dx + np.sin(k) * dy
    return _soft(faces.max(axis=0) - 0.575 * r)
  if name == "cross":
    w = 0.3 * r
    arm1 = np.maximum(np.abs(u) - r, np.abs(v) - w)
    arm2 = np.maximum(np.abs(v) - r, np.abs(u) - w)
    return _soft(np.minimum(arm1, arm2))
  if name == "ring":
    return _soft(np.abs(np.hypot(dx, dy) - 0.75 * r) - 0.22 * r)
  # Textures fill the image; a small random tilt keeps them from being exact.
  tilt = 0.15 * (p["angle"] / np.pi - 1.0)       # in [-0.15, 0.15] rad
  if name == "diagonal_stripes":
    tilt = tilt + np.where(p["flip"], np.pi / 4, -np.pi / 4)
  ct, st = np.cos(tilt), np.sin(tilt)
  tu, tv = ct * x + st * y, -st * x + ct * y
  per = p["period"]
  if name in ("horizontal_stripes", "diagonal_stripes"):
    return _wave(tv / per + p["phase_u"])
  if name == "vertical_stripes":
    return _wave(tu / per + p["phase_u"])
  if name == "checkerboard":
    s = (np.sin(2 * np.pi * (tu / per + p["phase_u"]))
         * np.sin(2 * np.pi * (tv / per + p["phase_v"])))
    return np.clip(0.5 + 3.0 * s, 0.0, 1.0)
  if name == "dots":
    fu = (tu / per + p["phase_u"]) % 1.0 - 0.5
    fv = (tv / per + p["phase_v"]) % 1.0 - 0.5
    return _soft(np.hypot(fu, fv) * per - 0.28 * per)
  raise AssertionError(name)


def demo_shapes(num_examples: int, seed: int = 0, size: int = 32):
  """Shapes and textures. Returns (uint8 (N, size, size, 3), int32 (N,))."""
  rng = np.random.default_rng(seed)
  n = num_examples
  labels = _balanced_labels(rng, n, len(SHAPE_CLASSES))
  u = lambda lo, hi: rng.uniform(lo, hi, n).astype(np.float32)
  params = dict(cx=u(0.35, 0.65) * size, cy=u(0.35, 0.65) * size,
                r=u(0.18, 0.32) * size, angle=u(0, 2 * np.pi),
                period=u(4.5, 8.5) * size / 32, phase_u=u(0, 1),
                phase_v=u(0, 1), flip=rng.random(n) < 0.5)
  bg = rng.uniform(0, 1, (n, 3)).astype(np.float32)
  # Each channel of the foreground is shifted by 0.3..0.7 (mod 1): contrast >= 0.3.
  fg = (bg + rng.uniform(0.3, 0.7, (n, 3))).astype(np.float32) % 1.0
  y, x = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
  alpha = np.empty((n, size, size), np.float32)
  for c in range(len(SHAPE_CLASSES)):
    idx = np.flatnonzero(labels == c)
    p = {k: v[idx, None, None] for k, v in params.items()}
    alpha[idx] = _shape_alpha(c, x, y, p)
  alpha = alpha[..., None]
  img = bg[:, None, None] * (1 - alpha) + fg[:, None, None] * alpha
  return _to_uint8(img, rng), labels


# Palettes per landscape class: sky top, sky horizon, far ridge, near ridge,
# ground (RGB in [0, 1]).
_PALETTES = np.array([
    [[.25, .45, .85], [.65, .80, .95], [.45, .55, .70], [.20, .40, .25], [.30, .55, .20]],
    [[.30, .20, .45], [.98, .60, .30], [.45, .25, .35], [.25, .12, .20], [.20, .15, .10]],
    [[.02, .02, .10], [.10, .12, .30], [.08, .10, .20], [.04, .05, .10], [.05, .06, .08]],
    [[.55, .65, .80], [.85, .88, .92], [.75, .78, .85], [.90, .92, .95], [.95, .95, .97]],
    [[.40, .60, .90], [.90, .85, .70], [.80, .60, .40], [.70, .45, .25], [.90, .75, .50]],
], np.float32)


def _ridge(rng, n, width, base, amp, num_waves=3):
  """Ridge heights (n, width) as a sum of sinusoids with uniform random phase."""
  x = np.arange(width, dtype=np.float32)
  freq = rng.uniform(1 / 48, 1 / 8, (n, num_waves, 1)).astype(np.float32)
  phase = rng.uniform(0, 2 * np.pi, (n, num_waves, 1)).astype(np.float32)
  a = amp[:, None, None] * rng.uniform(0.4, 1.0, (n, num_waves, 1))
  waves = a / num_waves * np.sin(2 * np.pi * freq * x + phase)
  return base[:, None] + waves.sum(axis=1).astype(np.float32)


def demo_landscapes(num_examples: int, seed: int = 0, height: int = 32,
                    width: int = 64):
  """Horizontally stationary landscapes. Returns (uint8 (N, H, W, 3), int32 (N,)).

  Every feature has a uniformly random horizontal phase or position, so the
  distribution of any column (and of any horizontal shift) is the same.
  """
  rng = np.random.default_rng(seed)
  n, h = num_examples, height
  labels = _balanced_labels(rng, n, len(LANDSCAPE_CLASSES))
  pal = _PALETTES[labels] * rng.uniform(0.85, 1.15, (n, 5, 1)).astype(np.float32)
  pal = np.clip(pal, 0, 1)
  # Colour table per image: rows 0..H-1 the sky gradient, then far ridge, near
  # ridge, ground, ground streak, star. A layer-index map gathers from it.
  t = ((np.arange(h, dtype=np.float32) + 0.5) / h)[None, :, None]
  sky = pal[:, None, 0] * (1 - t) + pal[:, None, 1] * t           # (n, H, 3)
  extra = np.stack([pal[:, 2], pal[:, 3], pal[:, 4], pal[:, 4] * 0.9,
                    np.full((n, 3), 0.9, np.float32)], axis=1)
  table = np.concatenate([sky, extra], axis=1)                    # (n, H+5, 3)
  u = lambda lo, hi: rng.uniform(lo, hi, n).astype(np.float32)
  y = np.arange(h, dtype=np.float32)[None, :, None] + 0.5         # (1, H, 1)
  idx = np.broadcast_to(np.arange(h, dtype=np.int32)[None, :, None],
                        (n, h, width)).copy()
  # Stars at night, uniform over columns (drawn first, hidden by the ridges).
  stars = rng.integers(0, 64, (n, h, width), dtype=np.uint8) == 0
  idx[stars & (labels == 2)[:, None, None]] = h + 4
  far = _ridge(rng, n, width, u(0.35, 0.5) * h, u(0.15, 0.3) * h)
  near = _ridge(rng, n, width, u(0.55, 0.7) * h, u(0.1, 0.25) * h)
  ground = u(0.75, 0.9) * h
  idx[y > far[:, None, :]] = h
  idx[y > near[:, None, :]] = h + 1
  below = np.broadcast_to(y > ground[:, None, None], idx.shape)
  # Ground texture: streaks along rows with a random phase per row.
  freq = rng.uniform(0.1, 0.5, (n, h, 1)).astype(np.float32)
  phase = rng.uniform(0, 2 * np.pi, (n, h, 1)).astype(np.float32)
  streak = np.sin(np.arange(width, dtype=np.float32) * freq + phase) > 0.5
  idx[below] = h + 2
  idx[below & streak] = h + 3
  img = np.take_along_axis(table, idx.reshape(n, -1, 1), axis=1)
  return _to_uint8(img.reshape(n, h, width, 3), rng), labels


def _to_uint8(img, rng):
  """Float image in [0, 1] -> uint8 with triangular noise of std ~6/255."""
  bits = rng.integers(0, 256, img.shape, dtype=np.uint8)
  noise = (bits & 15).astype(np.int16) + (bits >> 4) - 15
  out = (img * 255 + 0.5).astype(np.int16) + noise
  return np.clip(out, 0, 255).astype(np.uint8)


@functools.lru_cache(maxsize=8)
def _generated(kind: str, split_id: int, seed: int, num_examples: int):
  """The demo arrays of one (kind, split, seed, size), generated once per
  process: a chained run (``configs/demo*.py``) builds the same sources at
  every stage and evaluation, and 10 000 landscapes take seconds."""
  gen_seed = np.random.SeedSequence([seed, split_id, list(KINDS).index(kind)])
  fn = demo_shapes if kind == "shapes" else demo_landscapes
  images, labels = fn(num_examples, seed=gen_seed)
  for a in (images, labels):
    a.flags.writeable = False   # shared by every source of these settings
  return images, labels


class DemoSource:
  """Grain ``RandomAccessDataSource`` over a demo data set.

  ``source[i]`` -> ``{"image": uint8 (H, W, 3), "label": int32 ()}``. The split
  and kind pick an independent stream of the generator. The arrays come from
  ``_generated`` (once per process and setting, read-only) and are never
  pickled: each grain worker process generates its own.
  """

  def __init__(self, split: str = "train", *, kind: str = "shapes",
               num_examples: int | None = None, seed: int = 0):
    if kind not in KINDS:
      raise ValueError(f"Unknown demo kind {kind!r}; choose one of {list(KINDS)}.")
    if split not in SPLITS:
      raise ValueError(f"Unknown demo split {split!r}; choose one of "
                       f"{list(SPLITS)}.")
    self.split, self.kind, self.seed = split, kind, seed
    self.num_examples = num_examples or DEFAULT_SIZES[split]
    self.class_names = KINDS[kind]
    self.images, self.labels = self._generate()

  def _generate(self):
    """(images uint8 (N, H, W, 3), labels int32 (N,)), read-only."""
    return _generated(self.kind, SPLITS[self.split], self.seed,
                      self.num_examples)

  def __len__(self) -> int:
    return self.num_examples

  def __getitem__(self, index):
    index = int(index)
    return {"image": self.images[index], "label": self.labels[index]}

  def __getstate__(self):
    return {k: v for k, v in self.__dict__.items()
            if k not in ("images", "labels")}

  def __setstate__(self, state):
    self.__dict__.update(state)
    self.images, self.labels = self._generate()

  def __repr__(self):
    return (f"DemoSource(kind={self.kind!r}, split={self.split!r}, "
            f"num_examples={self.num_examples}, seed={self.seed})")
