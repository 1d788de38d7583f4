"""The weight-read floor and its timing, shared by the sampling benches.

A KV-cached decode step at small batch is bound by reading its weights (and
its cache): ``bench_rar_sampling.py`` and ``bench_far_sampling.py`` hold their
samplers to a floor of bare matmul chains over the same parameter arrays,
built from these pieces: stand-in cache reads in the sampler's chunks
(``ar.kv_chunks``), byte counts, ahead-of-time compiles, interleaved warm
timing and the table both print.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from genvis_jax.core import dtypes
from genvis_jax.sample import ar


def kv_stand_in(depth: int, rows: int, heads: int, head_dim: int, length: int,
                dtype=None):
  """Per layer a (k, v) pair of (rows, heads, length, head_dim) arrays: what
  a floor that also reads the KV cache reads (values are irrelevant)."""
  dtype = dtype or jnp.float32
  return [tuple(jnp.full((rows, heads, length, head_dim), 1e-2, dtype)
                for _ in range(2)) for _ in range(depth)]


def read_cache(x, kv):
  """The bytes attention over a cache must read, bare: q.K then s.V (no
  mask, no softmax). x (R, d); kv (k, v) each (R, H, M, Dh) -> (R, d)."""
  k, v = kv
  r, h = x.shape[0], k.shape[1]
  s = jax.lax.dot_general(k, x.reshape(r, h, -1).astype(k.dtype),
                          (((3,), (2,)), ((0, 1), (0, 1))))       # (R, H, M)
  o = jax.lax.dot_general(s, v, (((2,), (2,)), ((0, 1), (0, 1))))  # (R, H, Dh)
  return o.reshape(r, -1).astype(x.dtype)


def chunked_steps(step, x0, steps: int, kv, pos_offset: int, bucket: int):
  """Runs ``step(kv_or_None) -> fori_loop body`` for steps 0..steps-1: one
  loop without ``kv``, else one loop per decode chunk of the sampler
  (``ar.kv_chunks``; step 0 is the prefill) over the stand-in cache cut to
  the chunk's kv_len once per chunk, as the sampler resizes its cache."""
  if kv is None:
    return jax.lax.fori_loop(0, steps, step(None), x0)
  chunks = [(0, 1, pos_offset)] + ar.kv_chunks(steps, pos_offset, bucket)
  for start, stop, kv_len in chunks:
    cut = [(k[:, :, :kv_len], v[:, :, :kv_len]) for k, v in kv]
    x0 = jax.lax.fori_loop(start, stop, step(cut), x0)
  return x0


def cache_bytes(layers: int, rows: int, width: int, item: int, steps: int,
                pos_offset: int, bucket: int | None) -> float:
  """Mean bytes of keys + values one decode step reads from its cache: every
  layer's filled prefix as the sampler's chunks (``ar.kv_chunks``) cut it.
  Left out (under a few percent): the prefill reading the full-length cache
  it creates, and the once-per-chunk resize copies."""
  bucket = ar.DEFAULT_BUCKET if bucket is None else bucket
  chunks = [(0, 1, pos_offset)] + ar.kv_chunks(steps, pos_offset, bucket)
  positions = sum((stop - start) * kv_len for start, stop, kv_len in chunks)
  return positions * 2 * layers * rows * width * item / steps


def print_bytes(floor: float, weights: float, cache: float,
                unit: str = "step") -> None:
  """The byte count behind the floors: what ``floor`` reads per step, what an
  exact cached step must read (its weights once, its cache once) and their
  ratio, the least ``cached / floor`` can be where both stream at one rate."""
  print(f"bytes per {unit}: floor {floor / 1e6:.0f} MB of weights; a cached "
        f"{unit} {weights / 1e6:.0f} MB of weights + {cache / 1e6:.0f} MB of KV "
        f"cache (mean over the chunks) = {(weights + cache) / floor:.2f}x the "
        "floor's bytes")


def weight_bytes(tree, paths, item: int) -> int:
  """Bytes of the ``paths`` (tuples of keys) of ``tree`` at ``item`` bytes
  per element (the decode dtype's)."""
  total = 0
  for path in paths:
    x = tree
    for k in path:
      x = x[k]
    total += x.size
  return total * item


def sampling_precision(config) -> str:
  """Sets this process's fp32 matmul precision to the one ``mode=sample``
  runs ``config`` at (``dtypes.precision_name(config, inference=True)``:
  "tensorfloat32" for the RAR / FAR configs, "float32" for the Equivariant
  ones), so the sampler and its floor are timed as sampling computes (on a
  TPU XLA's default is one bf16 pass); returns the name, for the header."""
  name = dtypes.precision_name(config, inference=True)
  jax.config.update("jax_default_matmul_precision", name)
  return name


def sampler_opts(dtype, bucket):
  """Sampler keywords, only those set (so an older sampler runs too)."""
  kw = {} if dtype is None else {"dtype": dtype}
  return kw if bucket is None else dict(kw, bucket=bucket)


def aot(fn, *args):
  t0 = time.perf_counter()
  compiled = fn.lower(*args).compile()
  return time.perf_counter() - t0, lambda: compiled(*args)


def time_interleaved(runs: dict, repeats: int):
  """Runs every compiled ``runs[mode]()`` once per repeat, modes interleaved
  (so load drift hits them alike), after one untimed run each (a first run
  carries one-off costs: 1.35x the floor where warm runs gave 0.92x);
  returns ``(times, last outputs)``."""
  for f in runs.values():
    jax.block_until_ready(f())
  times, outs = {m: [] for m in runs}, {}
  for r in range(repeats):
    for mode, f in runs.items():
      t0 = time.perf_counter()
      outs[mode] = jax.block_until_ready(f())
      times[mode].append(time.perf_counter() - t0)
      print(f"repeat {r}: {mode} {times[mode][-1]:.2f} s", flush=True)
  return times, outs


def print_floor_table(times: dict, compile_s: dict, unit: str, units: int,
                      batch: int) -> None:
  """Markdown table of median times, ms per ``unit`` and the ratio to the
  ``floor`` mode, then cached / each floor mode per repeat."""
  sec = {m: statistics.median(t) for m, t in times.items()}
  base = sec.get("floor")
  print(f"| mode | compile s | sample s (median) | runs | ms/{unit} | "
        "images/s | x floor |")
  print("|---|---|---|---|---|---|---|")
  for mode in times:
    ratio = f"{sec[mode] / base:.2f}" if base else "-"
    each = " / ".join(f"{t:.3g}" for t in times[mode])
    print(f"| {mode} | {compile_s[mode]:.1f} | {sec[mode]:.3g} | {each} | "
          f"{1e3 * sec[mode] / units:.3g} | {batch / sec[mode]:.4g} | "
          f"{ratio} |")
  for floor in (m for m in times if m.startswith("floor")):
    if "cached" in times:
      pairs = [c / f for c, f in zip(times["cached"], times[floor])]
      print(f"cached / {floor} per repeat: "
            f"{', '.join(f'{x:.2f}' for x in pairs)} (of medians "
            f"{sec['cached'] / sec[floor]:.2f})")


DTYPES = ("float32", "bfloat16", "float16")


def check_args(p: argparse.ArgumentParser, args, modes) -> None:
  """Refuses, before a model is built (minutes at paper size), what would
  fail after it: an unknown mode (``cached_bN`` is ``cached`` with bucket
  N), a batch or repeat count below 1."""
  known = lambda m: (m in modes and m != "cached_bN") or (
      "cached_bN" in modes and m.startswith("cached_b")
      and m[len("cached_b"):].isdigit())
  bad = [m for m in args.modes.split(",") if not known(m)]
  if bad:
    p.error(f"--modes: unknown {bad}; choose from {', '.join(modes)}")
  for flag in ("batch", "repeats"):
    if getattr(args, flag) < 1:
      p.error(f"--{flag}={getattr(args, flag)} must be at least 1")


def parser(doc: str) -> argparse.ArgumentParser:
  """The scripts' parser: ``--help`` prints their docstring."""
  return argparse.ArgumentParser(
      description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
