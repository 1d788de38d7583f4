"""Where the time of RAR KV-cache sampling goes, beside its weight floor.

Compiles ``bench_rar_sampling``'s ``floor`` (the bare matmul chain over the
weights a straightforward step reads) and ``cached`` (``sample.rar.sample``)
for the same model and batch, runs each once to warm up, then traces one run
of each with ``jax.profiler``. Every op the trace records is mapped to the
model code that emitted it (the ``op_name`` in the compiled HLO's metadata)
and summed into the parts of a decode step. Per part the table gives seconds,
the share of the floor's time, and the bytes (or FLOPs) behind it with the
rate achieved, so "x floor" splits into what is inherent (weights, the KV
cache, the adaLN table) and what is overhead (norms, softmax, copies).

  python bench/profile_rar_sampling.py --size=b --batch=8

XLA:CPU only: there each executed op is a trace event named after its HLO
instruction (a GPU trace names kernels instead). The parts are op times:
XLA:CPU runs independent ops side by side (the next chunk's adaLN table
beside the current chunk's steps), so parts can overlap; "between ops" is
the traced wall time minus their sum and goes negative when they do. The
untraced times printed first are the ones to compare runs by.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import platform
import re
import sys
import tempfile
import time

import jax
import jax.numpy as jnp

# Run as a script from anywhere: the repository root is where ``bench`` lives.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# pylint: disable=wrong-import-position
from bench.accel_harness import commit_id  # noqa: E402
from bench.bench_rar_sampling import (byte_counts, floor_fn,  # noqa: E402
                                      model_config)
from bench.sampling_floor import sampling_precision  # noqa: E402
from genvis_jax import models  # noqa: E402
from genvis_jax.sample import rar as rar_sample  # noqa: E402

WEIGHTS = "weight matmuls (qkv, out, fc1, fc2, lm_head)"
TABLE = "adaLN table (once per chunk)"
ATTEND = "KV-cache reads (q.K, s.V)"
SOFTMAX = "softmax + mask"
CACHE_WRITE = "cache writes + resizes"
BLOCK_OTHER = "norms, modulation, GELU, residuals"
REST = "sampling, embeddings, prefill, loop"
PARTS = (WEIGHTS, TABLE, ATTEND, SOFTMAX, CACHE_WRITE, BLOCK_OTHER, REST)
IDLE = "between ops (runtime, thread hand-offs)"
_MATMUL = re.compile(r"/(qkv|out|proj|fc1|fc2|lm_head)/dot_general$")


def op_names(hlo_text: str) -> dict[str, tuple[str, str]]:
  """Instruction name -> (opcode or fusion kind, metadata op_name)."""
  out = {}
  for line in hlo_text.splitlines():
    line = re.sub(r"/\*.*?\*/", "", line)          # /*index=5*/ in tuples
    # The result shape may be a tuple (multi-output fusions): "(f32[..], ..)".
    m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (?:\([^=]*?\)|\S+) ([\w\-]+)\(",
                 line)
    if m and m.group(1) not in out:
      op = re.search(r'op_name="([^"]*)"', line)
      out[m.group(1)] = (m.group(2), op.group(1) if op else "")
  return out


def part_of(name: str, opcode: str, op_name: str) -> str:
  """The part of a decode step an executed op belongs to."""
  if "decode_modulation" in op_name:
    return TABLE
  if "prefill" in op_name:
    return REST
  if _MATMUL.search(op_name):
    return WEIGHTS
  if opcode == "dot":         # XLA drops the metadata of the batched q.K, s.V
    return ATTEND
  if "_attend" in op_name:
    return SOFTMAX
  if "pad" in name or "dynamic-update-slice" in name:
    return CACHE_WRITE
  if "/blocks_" in op_name:
    return BLOCK_OTHER
  return REST


def traced_parts(run, compiled, classify) -> tuple[dict, float]:
  """Traces one ``run()``; returns ({part: seconds}, wall seconds)."""
  ops = op_names(compiled.as_text())
  with tempfile.TemporaryDirectory() as d:
    with jax.profiler.trace(d):
      t0 = time.perf_counter()
      jax.block_until_ready(run())
      wall = time.perf_counter() - t0
    (path,) = glob.glob(f"{d}/**/*.trace.json.gz", recursive=True)
    with gzip.open(path) as f:
      events = json.load(f)
  events = events["traceEvents"] if isinstance(events, dict) else events
  parts = collections.Counter()
  for e in events:
    name = e.get("name", "")
    if e.get("ph") != "X" or name not in ops:   # runtime, Python frames
      continue
    opcode, op_name = ops[name]
    if opcode in ("while", "conditional", "call"):   # parents of their bodies
      continue
    parts[classify(name, opcode, op_name)] += e["dur"] / 1e6
  return dict(parts), wall


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--size", default="b", choices=["small", "b", "l", "xl"])
  p.add_argument("--batch", type=int, default=8)
  p.add_argument("--tokens", type=int, default=256)
  args = p.parse_args()
  from configs import rar_common  # pylint: disable=import-outside-toplevel
  precision = sampling_precision(rar_common.get_config(
      "b" if args.size == "small" else args.size))

  cfg = model_config(args.size, args.tokens)
  model = models.build(cfg)
  params = jax.jit(lambda k: models.init_params(cfg, k))(jax.random.key(0))
  # As bench_rar_sampling: the adaLN kernels start at zero.
  params = jax.tree_util.tree_map(lambda x: x + 0.02 * jnp.sin(
      jnp.arange(x.size, dtype=x.dtype).reshape(x.shape)), params)
  labels = jnp.arange(args.batch, dtype=jnp.int32) % cfg.num_classes
  sargs = tuple(jnp.float32(v) for v in (4.0, 1.0, 1.0))
  rows, steps = 2 * args.batch, args.tokens

  floor = floor_fn(model, steps, rows, True)
  cached = rar_sample.sampler_fn(model, cached=True, use_cfg=True)
  fargs, cargs = (params, None), (params, labels, jax.random.key(1), *sargs)
  compiled = {"floor": floor.lower(*fargs).compile(),
              "cached": cached.lower(*cargs).compile()}
  runs = {"floor": lambda: compiled["floor"](*fargs),
          "cached": lambda: compiled["cached"](*cargs)}
  plain = {}
  for name, run in runs.items():
    jax.block_until_ready(run())                  # warm-up
    t0 = time.perf_counter()
    jax.block_until_ready(run())
    plain[name] = time.perf_counter() - t0
  floor_parts, floor_wall = traced_parts(runs["floor"], compiled["floor"],
                                         lambda *_: WEIGHTS)
  parts, wall = traced_parts(runs["cached"], compiled["cached"], part_of)
  floor_parts[IDLE] = floor_wall - sum(floor_parts.values())
  parts[IDLE] = wall - sum(parts.values())

  floor_bytes, weights, cache = byte_counts(model, params, rows)
  d, conds = model.hidden_size, args.batch + 1
  table_flops = 2 * conds * steps * d * (model.depth * 6 * d + 2 * d)
  amounts = {("floor", WEIGHTS): (floor_bytes * steps, "GB"),
             ("cached", WEIGHTS): (weights * steps, "GB"),
             ("cached", ATTEND): (cache * steps, "GB"),
             ("cached", TABLE): (table_flops, "GFLOP")}
  dev = jax.devices()[0]
  print(f"# RAR sampling profile | size={args.size} batch={args.batch} "
        f"(x2 CFG = {rows} rows) tokens={steps} fp32, matmuls {precision} | "
        f"{dev.platform} "
        f"{platform.processor() or platform.machine()} jax {jax.__version__} "
        f"| commit {commit_id()}")
  print(f"untraced: floor {plain['floor']:.2f} s, cached {plain['cached']:.2f} "
        f"s ({plain['cached'] / plain['floor']:.2f}x); traced: floor "
        f"{floor_wall:.2f} s, cached {wall:.2f} s ({wall / floor_wall:.2f}x)")
  print("| run | part | s | x floor | GB or GFLOP | rate |")
  print("|---|---|---|---|---|---|")
  for run, ps in (("floor", floor_parts), ("cached", parts)):
    for part in (WEIGHTS, IDLE) if run == "floor" else PARTS + (IDLE,):
      sec = ps.get(part, 0.0)
      amount, unit = amounts.get((run, part), (0.0, ""))
      label = "weight matmuls (with adaLN)" if run == "floor" and part == WEIGHTS else part
      print(f"| {run} | {label} | {sec:.2f} | {sec / floor_wall:.3f} | "
            + (f"{amount / 1e9:.1f} {unit} | {amount / 1e9 / sec:.1f} {unit}/s |"
               if amount and sec > 0 else "- | - |"))
  print(f"| cached | total | {wall:.2f} | {wall / floor_wall:.2f} | - | - |")


if __name__ == "__main__":
  main()
