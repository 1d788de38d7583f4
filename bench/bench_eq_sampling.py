"""Equivariant sampler at paper size vs its memory-bandwidth floor, per column.

One long run of the cached sampler (``column_stepper``: the same jitted column
loop as ``sample``, in chunks of ``--window`` columns) times the chunk of
columns ending at each reported width (default 16, 32, 64, 128 with windows of
2: columns 15-16, 31-32, 63-64, 127-128 of a 128-column run). At each such
window the chunk and two floors over the same number of columns are timed
``--repeats`` times, interleaved, from the same state (minimum kept: the host
is shared). The floors are written here from the same model's weights:

* ``floor``: the issue's floor. Per Euler step the flow head's weights are read
  once (every head matmul, CFG's cond/uncond rows as one matmul; LayerNorms
  and biases left out), plus per column the transformer's per-column matmuls
  (z_proj; per block qkv, out, cross-attention q and out, fc1, fc2).
* ``hoisted floor``: the same chain for the algorithm the sampler runs: the
  adaLN / time / condition path of all steps of a column as one matmul, then
  per step the x path only (input_proj, mlp_0, mlp_2, final linear).

With ``--old`` it also times the per-step head (``hoist_modulations=False``,
the official loop) over the first window, for a speed-up ratio in the same
run; ``--whole=16`` times one jitted ``sample()`` of 16 columns (prefill
included) as a check on the windows. Times per column exclude compilation
(every function is warmed up on its own first call). Ratios, not absolute times, are the result on a shared host.

  python bench/bench_eq_sampling.py                   # eq_s, batch 1, CFG 7, 100 steps
  python bench/bench_eq_sampling.py --size=tiny --columns=16 --widths=8,16 --num_steps=10
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np

from bench.accel_harness import commit_id
from bench.bench_eq_long import random_params  # std 0.02, no init compile
from bench.sampling_floor import sampling_precision
from configs import eq_common
from genvis_jax import models
from genvis_jax.sample import common
from genvis_jax.sample import eq_generator as eq_sample

TINY = dict(hidden_size=64, depth=2, num_heads=4, head_width=64, head_depth=2,
            token_dim=16, num_classes=10, num_cond_tokens=4, window=4,
            seq_len=16, attn_dropout=0.0, proj_dropout=0.0)
# Parameters of the head's (t, z) path: hoisted out of the Euler steps.
MOD_PATH = ("adaLN_modulation_1", "time_embed", "cond_embed")
# Transformer parameters only the prefill reads (condition tokens).
PREFILL_ONLY = ("class_emb", "fake_latent", "encoder_pos_embed_learned",
                "cross_cond_norm", "cross_attn/k/", "cross_attn/v/")


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--size", default="s", choices=["tiny", *eq_common.SIZES])
  p.add_argument("--columns", type=int, default=128, help="columns of the run")
  p.add_argument("--widths", default="16,32,64,128",
                 help="report the window of columns ending at each width")
  p.add_argument("--window", type=int, default=2, help="columns per window")
  p.add_argument("--batch", type=int, default=1)
  p.add_argument("--cfg", type=float, default=7.0)
  p.add_argument("--num_steps", type=int, default=100)
  p.add_argument("--dtypes", default="float32,bfloat16")
  p.add_argument("--repeats", type=int, default=3,
                 help="interleaved timings per window (minimum kept)")
  p.add_argument("--old", action="store_true",
                 help="also time the per-step head over the first window")
  p.add_argument("--whole", type=int, default=16,
                 help="also time one jitted sample() of this many columns "
                      "(compile excluded) against the windows; 0 = off")
  return p.parse_args(argv)


def model_config(size):
  if size == "tiny":
    return eq_common.generator_model("s", **TINY)
  return eq_common.generator_model(size)




def _flat(tree):
  return {"/".join(str(getattr(k, "key", k)) for k in path) + "/": leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _nbytes(leaves):
  return sum(int(np.prod(a.shape)) * jnp.dtype(a.dtype).itemsize for a in leaves)


def byte_counts(params):
  """Bytes of the parameter groups the sampler reads (params or shapes).

  Returns dict: ``head`` (all of diffloss), ``head_mod`` (its (t, z) path:
  time/cond embedding and every adaLN), ``head_x`` (the rest), ``column``
  (transformer parameters read per column: z_proj, z_proj_ln, encoder_norm,
  per block norm1, attn, cross_norm, cross_attn q/out, norm2, mlp)."""
  flat = _flat(params)
  head = {k: v for k, v in flat.items() if k.startswith("diffloss/")}
  mod = [v for k, v in head.items() if any(m in k for m in MOD_PATH)]
  col = [v for k, v in flat.items() if not k.startswith("diffloss/")
         and not any(m in k for m in PREFILL_ONLY)]
  return dict(head=_nbytes(head.values()), head_mod=_nbytes(mod),
              head_x=_nbytes(head.values()) - _nbytes(mod), column=_nbytes(col))


def floor_bytes_per_column(params, num_steps, rows, hoisted):
  """Bytes read per column by the floor (``hoisted``: mod path once per chunk
  of ``eq_sample.steps_per_chunk`` steps)."""
  b = byte_counts(params)
  if not hoisted:
    return b["head"] * num_steps + b["column"]
  chunks = -(-num_steps // eq_sample.steps_per_chunk(num_steps, rows))
  return b["head_x"] * num_steps + b["head_mod"] * chunks + b["column"]


# --- the floors: bare matmul chains over the model's own weights ---------------------

def _mm(h, p):
  """h @ kernel of Dense params ``p``, in the kernel's dtype (as nn.Dense)."""
  w = p["kernel"]
  return jnp.dot(h.astype(w.dtype), w)


def _fit(v, n):
  """(..., m) -> (..., n): slice or tile (never of a matmul output)."""
  reps = -(-n // v.shape[-1])
  return jnp.concatenate([v] * reps, axis=-1)[..., :n] if reps > 1 else v[..., :n]


def _fold(h, d):
  """(R, n * d) -> (R, d): sum of the n slices (keeps every output used)."""
  return h.reshape(h.shape[0], -1, d).sum(1)


def _silu_y(net, t, z):
  """silu(y) of the head from t (broadcastable) and z: time and condition
  matmuls (the time features stand in for the sinusoidal embedding)."""
  te = net["time_embed"]
  f = _fit(z, te["mlp_0"]["kernel"].shape[0]) * t
  y = _mm(jax.nn.silu(_mm(f, te["mlp_0"])), te["mlp_2"])
  return jax.nn.silu(y + _mm(z * t, net["cond_embed"]))


def _mods(net, sy, depth):
  return [_mm(sy, net[f"res_blocks_{i}"]["adaLN_modulation_1"])
          for i in range(depth)] + [
              _mm(sy, net["final_layer"]["adaLN_modulation_1"])]


def _x_path(net, x2, mods, depth):
  h = _mm(x2, net["input_proj"])
  for i in range(depth):
    blk = net[f"res_blocks_{i}"]
    shift, scale, gate = jnp.split(mods[i], 3, axis=-1)
    g = h * (1 + scale) + shift
    h = h + gate * _mm(jax.nn.silu(_mm(g, blk["mlp_0"])), blk["mlp_2"])
  shift, scale = jnp.split(mods[-1], 2, axis=-1)
  return _mm(h * (1 + scale) + shift, net["final_layer"]["linear"])


def _transformer_chain(params, x2, depth):
  """One column through the transformer's per-column matmuls: (R, C) -> (R, d)."""
  h = _mm(x2, params["z_proj"])
  d = h.shape[-1]
  for i in range(depth):
    blk = params[f"encoder_blocks_{i}"]
    h = h + _mm(_fold(_mm(h, blk["attn"]["qkv"]), d), blk["attn"]["out"])
    h = h + _mm(_mm(h, blk["cross_attn"]["q"]), blk["cross_attn"]["out"])
    h = h + _mm(jax.nn.gelu(_mm(h, blk["mlp"]["fc1"])), blk["mlp"]["fc2"])
  return h


def make_floor(model, num_steps, use_cfg, hoisted, scale=7.0):
  """jitted (params, x (B, C) f32, z (R, d), n) -> x after n floor columns.

  Per column: ``num_steps`` Euler steps of the head chain (``hoisted``: the
  (t, z) path of k steps as one matmul per chunk, ``steps_per_chunk``), then
  the transformer chain gives the next column's z."""
  depth, hdepth = model.depth, model.head_depth
  times = eq_sample.step_times(num_steps)

  def euler(x, v):
    return x - common.guide(v, scale, use_cfg) / num_steps

  def twice(x):
    return common.twice(x, use_cfg)

  def column(params, x, z):
    net = params["diffloss"]["net"]
    if hoisted:
      k = eq_sample.steps_per_chunk(num_steps, z.shape[0])

      def chunk(t, x):
        t = t[:, None, None]
        mods = _mods(net, _silu_y(net, t.astype(z.dtype), z[None]), hdepth)
        def step(j, x):
          m = [jax.lax.dynamic_index_in_dim(a, j, keepdims=False) for a in mods]
          return euler(x, _x_path(net, twice(x), m, hdepth))
        return jax.lax.fori_loop(0, t.shape[0], step, x)

      x = eq_sample.over_chunks(chunk, times, k, x)
    else:   # t changes every step: the whole head is read every step
      def step(i, x):
        t = times[i].astype(z.dtype)
        m = _mods(net, _silu_y(net, t, z), hdepth)
        return euler(x, _x_path(net, twice(x), m, hdepth))
      x = jax.lax.fori_loop(0, num_steps, step, x)
    return x, _transformer_chain(params, twice(x), depth)

  @jax.jit
  def run(params, x, z, n):
    def body(_, carry):
      x, z = carry
      x, zn = column(params, x, z)
      return x, zn.astype(z.dtype)
    return jax.lax.fori_loop(0, n, body, (x, z))[0]

  return run


# --- measurement ------------------------------------------------------------------

def _timed(fn):
  t0 = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - t0


def run_dtype(model, params32, labels, args, dtype, widths):
  """One long stepped run; at each reported width the window's chunk, both
  floors (and the per-step head at the first width) are timed ``--repeats``
  times, interleaved, from the same state; the minimum of each is kept."""
  rng = jax.random.key(1)
  use_cfg = args.cfg != 1.0
  rows = args.batch * (2 if use_cfg else 1)
  mdl, params = common.for_decoding(model, params32, dtype)
  kw = dict(num_columns=args.columns, guidance_scale=args.cfg, num_steps=args.num_steps,
            chunk=args.window)
  floors = {h: make_floor(mdl, args.num_steps, use_cfg, h) for h in (False, True)}
  x0 = jnp.zeros((args.batch, model.token_dim), jnp.float32)
  z0 = jnp.full((rows, model.hidden_size), 0.1, mdl.dtype)
  n = jnp.int32(args.window)
  fns = {name: (lambda f=f: f(params, x0, z0, n))
         for name, f in (("floor", floors[False]), ("hoisted", floors[True]))}
  state, advance = eq_sample.column_stepper(mdl, params, labels, rng, **kw)
  old = None
  if args.old:
    old = eq_sample.column_stepper(mdl, params, labels, rng,
                                   hoist_modulations=False, **kw)[1]
  for f in fns.values():               # compile + warm up
    jax.block_until_ready(f())
  state = jax.block_until_ready(advance(state, 0))
  if old is not None:
    jax.block_until_ready(old(state, args.window))
  out = []
  for start in range(args.window, args.columns, args.window):
    end = start + args.window
    if end not in widths:
      state = advance(state, start)
      continue
    runs = dict(fns, ours=lambda s=state, c=start: advance(s, c))
    if old is not None and end == widths[0]:
      runs["old"] = lambda s=state, c=start: old(s, c)
    best = {k: float("inf") for k in runs}
    for _ in range(args.repeats):
      for k, f in runs.items():
        best[k] = min(best[k], _timed(f) / args.window)
    state = advance(state, start)
    row = dict(dtype=dtype, width=end, ours=best["ours"], floor=best["floor"],
               hoisted=best["hoisted"], old=best.get("old", float("nan")))
    out.append(row)
    print(_fmt(row, args), flush=True)
    if "old" in best:
      print(f"  per-step head (official loop) at width {end}: "
            f"{best['old']:.4f} s/col = {best['old'] / best['ours']:.2f}x ours",
            flush=True)
  if args.whole:
    run = lambda: eq_sample.sample(mdl, params, labels, rng,
                                   guidance_scale=args.cfg,
                                   num_columns=args.whole,
                                   num_steps=args.num_steps)
    jax.block_until_ready(run())       # compile + warm up
    tw = _timed(run) / args.whole
    out[0]["whole"] = tw
    print(f"  one jitted sample() of {args.whole} columns: {tw:.4f} s/col "
          f"(prefill included) = {tw / out[0]['ours']:.3f}x the window at "
          f"width {out[0]['width']}", flush=True)
  b = dict(floor=floor_bytes_per_column(params, args.num_steps, rows, False),
           hoisted=floor_bytes_per_column(params, args.num_steps, rows, True))
  return out, b, np.asarray(state[2])


def _fmt(r, args):
  del args
  return (f"| {r['dtype']} | {r['width']} | {r['ours']:.4f} | {r['floor']:.4f} | "
          f"{r['ours'] / r['floor']:.2f} | {r['hoisted']:.4f} | "
          f"{r['ours'] / r['hoisted']:.2f} |")


def main(argv=None):
  args = parse_args(argv)
  widths = [int(w) for w in args.widths.split(",")]
  if args.columns % args.window or any(w % args.window or w > args.columns
                                       or w <= args.window for w in widths):
    raise SystemExit("--widths must be multiples of --window, above it and "
                     "at most --columns")
  precision = sampling_precision(eq_common.get_config(
      "s" if args.size == "tiny" else args.size))
  cfg = model_config(args.size)
  model = models.build(cfg)
  params = random_params(cfg)
  labels = jnp.arange(args.batch, dtype=jnp.int32) % cfg.num_classes
  b32 = byte_counts(params)
  print(f"# commit {commit_id()}  jax {jax.__version__}  "
        f"device {jax.devices()[0].device_kind} ({os.cpu_count()} cpus)  "
        f"matmuls {precision}")
  print(f"# eq_{args.size}: params {models.count_params(params) / 1e6:.1f}M, "
        f"head {b32['head'] / 4e6:.1f}M (mod path {b32['head_mod'] / 4e6:.1f}M, "
        f"x path {b32['head_x'] / 4e6:.1f}M), transformer per column "
        f"{b32['column'] / 4e6:.1f}M; batch {args.batch}, cfg {args.cfg}, "
        f"{args.num_steps} Euler steps, {args.columns}-column run, "
        f"windows of {args.window} columns")
  print("| dtype | width (window end) | ours s/col | floor s/col | ours/floor "
        "| hoisted floor s/col | ours/hoisted floor |")
  print("|---|---|---|---|---|---|---|")
  results, latents = {}, {}
  for dtype in args.dtypes.split(","):
    rows, b, lat = run_dtype(model, params, labels, args, dtype, widths)
    results[dtype] = (rows, b)
    latents[dtype] = lat
  print()
  for dtype, (rows, b) in results.items():
    flat = rows[-1]["ours"] / rows[0]["ours"]
    # The same ratio with each time divided by its own window's floor: the
    # host's load drift cancels (the floor does the same work at every width).
    flat_n = (rows[-1]["ours"] / rows[-1]["floor"]) / (
        rows[0]["ours"] / rows[0]["floor"])
    print(f"# {dtype}: bytes read per column: floor {b['floor'] / 1e9:.2f} GB, "
          f"hoisted {b['hoisted'] / 1e9:.2f} GB; {rows[-1]['width']}-col / "
          f"{rows[0]['width']}-col time per column {flat:.3f} (floor-"
          f"normalised {flat_n:.3f}); worst ours/floor "
          f"{max(r['ours'] / r['floor'] for r in rows):.2f}, worst ours/hoisted "
          f"floor {max(r['ours'] / r['hoisted'] for r in rows):.2f}")
  if len(results) > 1 and "float32" in results:
    for dtype, (rows, b) in results.items():
      if dtype == "float32":
        continue
      r32, b32_ = results["float32"]
      print(f"# {dtype} / float32: bytes {b['floor'] / b32_['floor']:.2f}, "
            f"time per column at width {rows[0]['width']} "
            f"{rows[0]['ours'] / r32[0]['ours']:.2f} (separate runs, same "
            "process)")
      d = latents[dtype] - latents["float32"]
      ref = latents["float32"]
      print(f"# {dtype} vs float32 latents ({args.columns} columns, same key): "
            f"max |diff| / max |fp32| {np.abs(d).max() / np.abs(ref).max():.2e}, "
            f"rms diff / rms fp32 {np.sqrt((d ** 2).mean() / (ref ** 2).mean()):.2e}")
  return results


if __name__ == "__main__":
  main()
