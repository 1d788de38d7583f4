"""Accelerator suite: everything one short GPU/TPU window can tell us, ~8 minutes.

  python bench/accelerator.py --out=$OUT            # on the accelerator
  python bench/accelerator.py --smoke --out=/tmp/a  # CPU, tiny shapes (CI)

Sections run in order of value, each in its own time box (a deadline checked
between measured iterations; a compile cannot be interrupted). A section that
fails or runs out of time records why and the next one runs. Results go to
stdout as markdown tables and, after every section, to ``OUT/results.json`` and
``OUT/results.md`` (so a run killed at the command limit keeps what it measured).

  attention_check  Pallas windowed causal attention (the backend's kernel; on
                CPU the GPU kernel in interpret mode): forward / backward error
                vs the XLA reference, fp32.
  attention     The kernel's ms, TFLOP/s and speed-up vs dense masked and banded
                XLA attention at N = 4k, 16k, 64k, W = 512 tokens, bf16.
  rar_sampling  RAR-B / RAR-XL KV-cache sampling, bf16, CFG, 256 tokens, batch
                64 / 256: images/s without and with the MaskGIT VQGAN decode
                (fp32), compile seconds apart.
  rar_train     RAR-XL train step (bf16 compute, fp32 master weights, AdamW),
                one device, largest batch that fits per remat policy: step time,
                tokens/s, MFU, peak memory.
  far_sampling  FAR-B (dual) KV-cache sampling images/s (codes, CFG 2.0).
  eq_sampling   Equivariant-L column sampler (CFG, 100 flow steps): columns/s
                at 16 and 128 columns.
  inception     FID Inception extractor images/s at batch 500 (256 px uint8).
  attention_blocks  Pallas tile sizes (block_q x block_k) at N = 16k: ms.

All weights are random: these are speed and memory numbers, not quality ones.

Runs from a copy of the repository without installing it (the repository root
goes on ``sys.path``). ``ml_collections`` is found on ``sys.path`` or, failing
that, as a wheel / directory in ``--wheels`` (default ``<repo>/wheels``; also
``$GENVIS_WHEELS``): ``pip download ml_collections --no-deps -d wheels/`` (a
pure-Python wheel is a zip that Python imports from directly). Its own
dependencies, absl-py and PyYAML, come with orbax-checkpoint / chex / flax.
The commit is read from ``git rev-parse HEAD``, else ``$GENVIS_COMMIT``, else a
``COMMIT`` file at the repository root.
"""

from __future__ import annotations

import argparse
import dataclasses
import faulthandler
import glob
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:   # run from a copy of the repository, not installed
  sys.path.insert(0, ROOT)

# pylint: disable=wrong-import-position
from genvis_jax.errors import UserError  # noqa: E402  (no dependencies)

# Dense bf16 peak FLOP/s per chip by ``device_kind`` substring (lower case),
# first match wins. Vendor data sheets (dense, no sparsity).
PEAK_BF16 = (
    ("h100 pcie", 756e12),
    ("h200", 990e12), ("h100", 990e12),    # also GH200
    ("a100", 312e12),
    ("tpu v6", 918e12), ("tpu v5p", 459e12), ("tpu v5 lite", 197e12),
    ("tpu v5e", 197e12), ("tpu v5", 459e12), ("tpu v4", 275e12),
)


def peak_flops(device_kind: str) -> float | None:
  """Dense bf16 FLOP/s of ``device_kind`` or None (MFU is then omitted)."""
  kind = device_kind.lower()
  for key, value in PEAK_BF16:
    if key in kind:
      return value
  return None


# --------------------------------------------------------------------------
# Bootstrap: repository root and ml_collections without installing anything.


class MissingMlCollectionsError(UserError, ImportError):
  """ml_collections is neither installed nor carried (message: how to carry
  it)."""


def ensure_ml_collections(wheel_dirs) -> str:
  """Imports ml_collections, adding carried pure-Python wheels if needed.

  Every ``*.whl`` in ``wheel_dirs`` goes on ``sys.path`` (ml_collections and,
  where the machine lacks them, absl-py; PyYAML has compiled parts and must be
  installed). Returns where ml_collections came from. Raises
  MissingMlCollectionsError (a UserError) naming the missing module and the fix.
  """
  try:
    import ml_collections  # pylint: disable=import-outside-toplevel
    return os.path.dirname(os.path.dirname(ml_collections.__file__))
  except ImportError:
    pass
  dirs = [d for d in wheel_dirs if d]
  for d in dirs:
    for whl in sorted(glob.glob(os.path.join(d, "*.whl"))):
      if whl not in sys.path:
        sys.path.insert(0, whl)
    if os.path.isdir(os.path.join(d, "ml_collections")) and d not in sys.path:
      sys.path.insert(0, d)
  try:
    import ml_collections  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    missing = getattr(e, "name", None) or "ml_collections"
    if missing.split(".")[0] != "ml_collections":
      raise MissingMlCollectionsError(
          f"ml_collections was found but needs {missing!r}, which is not "
          f"installed here ({e}). Carry it next to ml_collections: `pip "
          f"download absl-py --no-deps -d wheels/` (PyYAML must be installed)."
      ) from e
    raise MissingMlCollectionsError(
        "ml_collections is not importable and no wheel was found in "
        f"{dirs}. Carry one: `pip download ml_collections --no-deps -d "
        "wheels/` in the repository (or pass --wheels=DIR).") from e
  return os.path.dirname(os.path.dirname(ml_collections.__file__))


def commit_id() -> str:
  try:
    out = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT,
                         capture_output=True, text=True, timeout=10)
    if out.returncode == 0 and out.stdout.strip():
      dirty = subprocess.run(["git", "status", "--porcelain", "-uno"], cwd=ROOT,
                             capture_output=True, text=True, timeout=10)
      return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
  except (OSError, subprocess.SubprocessError):
    pass
  if os.environ.get("GENVIS_COMMIT"):
    return os.environ["GENVIS_COMMIT"]
  path = os.path.join(ROOT, "COMMIT")
  if os.path.exists(path):
    with open(path) as f:
      return f.read().strip()
  return "unknown"


# --------------------------------------------------------------------------
# Time boxes and reporting.


class SectionTimeout(Exception):
  """The section's deadline passed between two measurements."""


class Deadline:

  def __init__(self, end: float):
    self.end = end

  def left(self) -> float:
    return self.end - time.perf_counter()

  def check(self, what: str = ""):
    if self.left() <= 0:
      raise SectionTimeout(f"time box over before {what}" if what else
                           "time box over")

  def require(self, seconds: float, what: str):
    """Stops before work expected to take ``seconds`` (e.g. as long as the
    last such step) that would overrun the box: compiles cannot be cut short,
    and an overrun is taken from the sections after this one."""
    if self.left() < seconds:
      raise SectionTimeout(f"{what} skipped: expected to take ~{seconds:.0f} s"
                           f", {max(0.0, self.left()):.0f} s left")


@dataclasses.dataclass
class Section:
  """One section's results; rows are appended as they are measured."""
  name: str
  columns: tuple
  rows: list = dataclasses.field(default_factory=list)
  notes: list = dataclasses.field(default_factory=list)
  status: str = "pending"
  seconds: float = 0.0

  def add(self, **row):
    self.rows.append(row)
    print("  " + " | ".join(f"{k}={_fmt(v)}" for k, v in row.items()),
          flush=True)

  def note(self, text: str):
    self.notes.append(text)
    print(f"  note: {text}", flush=True)

  def markdown(self) -> str:
    lines = [f"### {self.name}: {self.status} ({self.seconds:.0f} s)", ""]
    if self.rows:
      cols = list(self.columns) + sorted(
          {k for r in self.rows for k in r} - set(self.columns))
      lines.append("| " + " | ".join(cols) + " |")
      lines.append("|" + "---|" * len(cols))
      for r in self.rows:
        lines.append("| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |")
      lines.append("")
    lines += [f"- {n}" for n in self.notes]
    return "\n".join(lines).rstrip() + "\n"


def _fmt(v) -> str:
  if v is None:
    return "-"
  if isinstance(v, float):
    if v == 0 or 0.01 <= abs(v) < 1e5:
      return f"{v:.3g}" if abs(v) < 10 else f"{v:.1f}"
    return f"{v:.3e}"
  return str(v)


def _err(e: BaseException) -> str:
  first = (str(e).strip().splitlines() or [""])[0]
  return f"{type(e).__name__}: {first[:300]}"


def write_results(out: str, header: dict, sections) -> None:
  os.makedirs(out, exist_ok=True)
  data = {"header": header, "sections": {
      s.name: {"status": s.status, "seconds": round(s.seconds, 2),
               "rows": s.rows, "notes": s.notes} for s in sections}}
  tmp = os.path.join(out, "results.json.tmp")
  with open(tmp, "w") as f:
    json.dump(data, f, indent=1, default=str)
  os.replace(tmp, os.path.join(out, "results.json"))
  md = ["# Accelerator suite", ""]
  md += [f"- {k}: {v}" for k, v in header.items()]
  md.append("")
  md += [s.markdown() for s in sections]
  with open(os.path.join(out, "results.md"), "w") as f:
    f.write("\n".join(md))


# --------------------------------------------------------------------------
# Measurement helpers (jax imported lazily: the bootstrap runs first).


def block(x):
  import jax  # pylint: disable=import-outside-toplevel
  return jax.block_until_ready(x)


def timed(fn, *args):
  """(seconds, result) of one blocking call."""
  t0 = time.perf_counter()
  out = block(fn(*args))
  return time.perf_counter() - t0, out


def repeat_ms(fn, args, deadline: Deadline, iters: int, what: str):
  """Median ms of up to ``iters`` calls after one warm-up; stops early (at
  least one timed call) when the deadline passes."""
  deadline.check(what)
  block(fn(*args))  # warm-up (compile when not AOT)
  times = []
  for _ in range(iters):
    times.append(timed(fn, *args)[0] * 1e3)
    if deadline.left() <= 0:
      break
  return statistics.median(times)


def aot(fn, *args):
  """(compile seconds, compiled) of a jitted fn for these arguments."""
  t0 = time.perf_counter()
  compiled = fn.lower(*args).compile()
  return time.perf_counter() - t0, compiled


def cost_flops(compiled) -> float | None:
  """FLOPs XLA counts for one call of a compiled (or lowered) function
  (``cost_analysis`` is a dict on new jax, a one-element list on older)."""
  try:
    cost = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  flops = (cost or {}).get("flops")
  return float(flops) if flops and flops > 0 else None


def memory_bytes(compiled) -> dict:
  m = compiled.memory_analysis()
  if m is None:
    return {}
  d = {k: int(getattr(m, f"{k}_size_in_bytes", 0) or 0)
       for k in ("argument", "output", "alias", "temp", "generated_code")}
  d["peak"] = (d["argument"] + d["output"] - d["alias"] + d["temp"]
               + d["generated_code"])
  return d


def device_memory(dev) -> dict:
  try:
    stats = dev.memory_stats() or {}
  except Exception:  # pylint: disable=broad-except
    stats = {}
  return stats


def gib(n) -> float | None:
  return None if n is None else n / 2**30


def load_config(spec: str):
  from bench import plan_memory  # pylint: disable=import-outside-toplevel
  return plan_memory.load_config(spec)


def random_params(cfg, seed=0):
  import jax  # pylint: disable=import-outside-toplevel
  from genvis_jax import models  # pylint: disable=import-outside-toplevel
  return jax.jit(lambda k: models.init_params(cfg, k))(jax.random.key(seed))


def host_random_params(abstract, seed=0):
  """Random numpy parameters for an abstract tree: kernels N(0, 1 / fan_in),
  1-D ``scale`` / ``var`` ones, other 1-D zeros. Compiling the Inception init
  costs ~45 s of XLA:CPU time; this costs under a second."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  rs = np.random.RandomState(seed)

  def leaf(path, a):
    name = str(getattr(path[-1], "key", path[-1]))
    if a.ndim <= 1:
      fill = np.ones if name in ("scale", "var") else np.zeros
      return fill(a.shape, a.dtype)
    fan_in = int(np.prod(a.shape[:-1]))
    return (rs.standard_normal(a.shape) / np.sqrt(fan_in)).astype(a.dtype)
  return jax.tree_util.tree_map_with_path(leaf, abstract)


# --------------------------------------------------------------------------
# Sizes: the real run and the CPU smoke run.


@dataclasses.dataclass
class Sizes:
  attn_check: tuple      # (B, N, H, D, window) fp32 correctness shapes
  attn_seqs: tuple       # timed N
  attn_shape: tuple      # (B, H, D)
  attn_window: int       # tokens (tokens_per_column = 1)
  attn_iters: int
  attn_blocks: tuple     # (block_q, block_k) tried by attention_blocks
  dense_max_n: int       # dense masked attention above this N is skipped
  rar_sizes: tuple
  rar_batches: tuple
  train_probe: int       # per-device batch of the memory probe compile
  train_max: int         # largest batch tried
  train_remats: tuple
  train_steps: int
  far_batch: int
  eq_batch: int
  eq_columns: tuple
  eq_flow_steps: int
  incep_batch: int
  incep_image: int
  iters: int


REAL = Sizes(
    attn_check=(1, 512, 4, 64, 128), attn_seqs=(4096, 16384, 65536),
    attn_shape=(1, 16, 64), attn_window=512, attn_iters=10, dense_max_n=16384,
    attn_blocks=((32, 64), (64, 64), (64, 128), (128, 64), (128, 128)),
    rar_sizes=("b", "xl"), rar_batches=(64, 256), train_probe=32,
    train_max=1024, train_remats=("none", "dots", "full"), train_steps=5,
    far_batch=64, eq_batch=64, eq_columns=(16, 128), eq_flow_steps=100,
    incep_batch=500, incep_image=256, iters=3)

SMOKE = Sizes(
    attn_check=(1, 64, 2, 16, 16), attn_seqs=(64, 128), attn_shape=(1, 2, 16),
    attn_window=16, attn_iters=2, dense_max_n=64,
    attn_blocks=((16, 32),), rar_sizes=("b",),
    rar_batches=(2,), train_probe=2, train_max=8, train_remats=("full",),
    train_steps=2, far_batch=2, eq_batch=2, eq_columns=(2, 4), eq_flow_steps=2,
    incep_batch=2, incep_image=32, iters=1)

# Tiny models for --smoke: the paper configs with their sizes overridden, so
# the same builders, samplers and train step run.
SMOKE_RAR = dict(depth=2, hidden_size=32, num_heads=2, mlp_dim=64,
                 codebook_size=256, seq_len=64, max_pos=128, num_timesteps=80)
SMOKE_FAR = dict(n_layer=2, n_head_layer=1, dim=32, n_head=2, codebook_size=64,
                 grid=4, multiple_of=16)
SMOKE_EQ = dict(depth=2, hidden_size=32, num_heads=2, head_width=32,
                head_depth=1, token_dim=8, num_cond_tokens=2)


# Sampling rows per dtype: the accelerator mode first (it is the one to have
# if the time runs out), then the fp32 reference.
SAMPLE_DTYPES = ("bfloat16", "float32")
WEIGHT_READ_NOTE = (
    "weight_gb_per_s = all parameter bytes (in dtype) / time per step: the "
    "rate at which a step that reads every weight once would stream them, to "
    "hold against the memory bandwidth (H200 HBM3e: 4.8 TB/s); RAR's adaLN "
    "weights are not read per step (per-chunk tables), so its true rate is "
    "lower.")


def weight_read_gbps(n_params: int, dtype: str, step_ms: float) -> float:
  """GB/s a decode step of ``step_ms`` would stream reading every weight once."""
  item = 2 if dtype == "bfloat16" else 4
  return n_params * item / (step_ms * 1e-3) / 1e9


def _shrink(model_cfg, overrides):
  with model_cfg.unlocked():
    model_cfg.update(overrides)
  return model_cfg


# --------------------------------------------------------------------------
# Sections.


def band_pairs(n: int, w: int) -> int:
  """Visible (query, key) pairs of windowed causal attention, 1 token/column."""
  w = min(w, n)
  return w * (w + 1) // 2 + (n - w) * w


def _kernel_impl() -> str:
  """The backend's Pallas kernel; on CPU the GPU one (interpret mode)."""
  import jax  # pylint: disable=import-outside-toplevel
  from genvis_jax.kernels.windowed_attention import resolve_impl  # pylint: disable=import-outside-toplevel
  kernel = resolve_impl("auto", jax.default_backend())
  return "pallas_gpu" if kernel == "reference" else kernel


# Max |kernel - reference| / max |reference| allowed per output (fp32 inputs;
# GPU dots may run at TF32 in both the kernel and XLA).
ATTN_TOL = 2e-2


def section_attention_check(sec: Section, dl: Deadline, sz: Sizes, smoke: bool):
  """Forward and backward of the Pallas kernel vs the banded XLA reference."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from bench import bench_windowed_attention as bwa  # pylint: disable=import-outside-toplevel
  kernel = _kernel_impl()
  backend = jax.default_backend()
  sec.note(f"kernel {kernel} on {backend}"
           + ("" if backend in ("gpu", "tpu") else " (interpret mode)"))
  b, n, h, d, w = sz.attn_check
  keys = jax.random.split(jax.random.key(0), 4)
  q, k, v, do = (jax.random.normal(key, (b, n, h, d), jnp.float32)
                 for key in keys)
  ns = argparse.Namespace(window=w, tokens_per_column=1, block_q=None,
                          block_k=None)
  dl.check("kernel")
  o1, (dq1, dk1, dv1) = bwa.make_fn(kernel, "fwd+bwd", ns)(q, k, v, do)
  o0, (dq0, dk0, dv0) = bwa.make_fn("reference", "fwd+bwd", ns)(q, k, v, do)
  bad = []
  for name, got, ref in (("out", o1, o0), ("dq", dq1, dq0), ("dk", dk1, dk0),
                         ("dv", dv1, dv0)):
    err = float(jnp.max(jnp.abs(got - ref)))
    rel = err / max(float(jnp.max(jnp.abs(ref))), 1e-30)
    sec.add(output=name, shape=f"B={b} N={n} H={h} D={d} W={w}",
            dtype="float32", max_abs_err=err, rel_err=rel,
            ok=rel < ATTN_TOL)
    if not rel < ATTN_TOL:
      bad.append(f"{name} rel err {rel:.2e}")
  if bad:
    raise AssertionError(f"{kernel} differs from the XLA reference beyond "
                         f"{ATTN_TOL}: {', '.join(bad)}")


def section_attention(sec: Section, dl: Deadline, sz: Sizes, smoke: bool):
  """bf16 timing of the kernel vs dense masked and banded XLA attention."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from bench import bench_windowed_attention as bwa  # pylint: disable=import-outside-toplevel
  kernel = _kernel_impl()
  if jax.default_backend() not in ("gpu", "tpu"):
    sec.note(f"{kernel} in interpret mode: times say nothing about speed")
  b, h, d = sz.attn_shape
  w = sz.attn_window
  ns = argparse.Namespace(window=w, tokens_per_column=1, block_q=None,
                          block_k=None)
  for n in sz.attn_seqs:
    keys = jax.random.split(jax.random.key(n), 4)
    inputs = [jax.random.normal(key, (b, n, h, d), jnp.bfloat16) for key in keys]
    fwd_flops = 4.0 * b * h * d * band_pairs(n, w)  # QK^T and PV, 2 per MAC
    for mode, flops in (("fwd", fwd_flops), ("fwd+bwd", 3.5 * fwd_flops)):
      base = {}
      for impl in ("dense", "reference", kernel):
        if impl == "dense" and n > sz.dense_max_n:
          sec.add(N=n, W=w, mode=mode, impl=impl,
                  note=f"skipped above N={sz.dense_max_n} (N^2 fp32 "
                       f"logits: {b * h * n * n * 4 / 2**30:.3g} GiB)")
          continue
        dl.check(f"N={n} {mode} {impl}")
        try:
          ms = repeat_ms(bwa.make_fn(impl, mode, ns), inputs, dl,
                         sz.attn_iters, f"N={n} {mode} {impl}")
        except SectionTimeout:
          raise
        except Exception as e:  # pylint: disable=broad-except
          sec.add(N=n, W=w, mode=mode, impl=impl, note=f"failed: {_err(e)}")
          continue
        base[impl] = ms
        sec.add(N=n, W=w, mode=mode, impl=impl, ms=ms,
                tflops=flops / (ms * 1e-3) / 1e12,
                vs_dense=(base["dense"] / ms) if "dense" in base else None,
                vs_banded=(base["reference"] / ms)
                if "reference" in base else None)
      del base
    del inputs
  sec.note("TFLOP/s counts only the visible band (4·B·H·D·pairs forward, "
           "3.5x that for forward + backward) for every implementation, so "
           "dense attention's wasted work shows as a low rate; vs_dense / "
           "vs_banded are speed-ups (> 1 = faster).")


def section_rar_sampling(sec: Section, dl: Deadline, sz: Sizes, smoke: bool):
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from genvis_jax import models  # pylint: disable=import-outside-toplevel
  from genvis_jax.sample import rar as rar_sample  # pylint: disable=import-outside-toplevel
  tok_cfg = load_config("configs/maskgit_vqgan.py").model
  if smoke:
    from configs import maskgit_vqgan  # pylint: disable=import-outside-toplevel
    tok_cfg = maskgit_vqgan.runlocal_model(tok_cfg)
  tok_cfg.dtype = "float32"   # decode in fp32 (the project's sampling rule)
  tok = models.build(tok_cfg)
  tok_params = random_params(tok_cfg, 1)
  decode = jax.jit(lambda p, c: tok.apply({"params": p}, c, method="decode"))
  decoded = {}   # batch -> (compile s, decode s)
  last_cost = 0.0
  for size in sz.rar_sizes:
    cfg = load_config(f"configs/rar_{size}.py")
    m = cfg.model
    if smoke:
      _shrink(m, SMOKE_RAR)
    m.dtype = "float32"   # the sample dtype switch sets the compute dtype
    model = models.build(m)
    dl.check(f"RAR-{size} init")
    params = random_params(m)
    n_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
    side = int(round(m.seq_len ** 0.5))
    s = cfg.sample
    for batch in sz.rar_batches:
      for dtype in SAMPLE_DTYPES:
        # Expect about as long as the previous case; skip what would overrun.
        dl.require(last_cost, f"RAR-{size} batch {batch} {dtype}")
        t_case = time.perf_counter()
        fn = rar_sample.sampler_fn(model, cached=True, use_cfg=True, dtype=dtype)
        labels = jnp.arange(batch, dtype=jnp.int32) % m.num_classes
        args = (params, labels, jax.random.key(batch), jnp.float32(
            s.guidance_scale), jnp.float32(s.guidance_pow),
                jnp.float32(s.temperature))
        comp_s, compiled = aot(fn, *args)
        runs = []
        for _ in range(sz.iters):
          runs.append(timed(compiled, *args))
          if dl.left() <= 0:
            break
        sample_s = statistics.median(t for t, _ in runs)
        codes = runs[-1][1].reshape(batch, side, side)
        if batch not in decoded:   # decode cost does not depend on the RAR size
          dl.check(f"decode batch {batch}")
          dcomp_s, dcompiled = aot(decode, tok_params, codes)
          decoded[batch] = (dcomp_s, statistics.median(
              timed(dcompiled, tok_params, codes)[0] for _ in range(sz.iters)))
        dcomp_s, dec_s = decoded[batch]
        step_ms = 1e3 * sample_s / m.seq_len
        sec.add(model=f"RAR-{size.upper()}", dtype=dtype,
                params_m=n_params / 1e6, batch=batch, tokens=m.seq_len,
                compile_s=comp_s, sample_s=sample_s, step_ms=step_ms,
                weight_gb_per_s=weight_read_gbps(n_params, dtype, step_ms),
                images_per_s=batch / sample_s, decode_compile_s=dcomp_s,
                decode_s=dec_s, images_per_s_decoded=batch / (sample_s + dec_s))
        last_cost = 0.8 * (time.perf_counter() - t_case)
    del params
  sec.note("CFG doubles the batch (cond + null class rows); guidance settings "
           "from the config; dtype = the sampler's dtype switch (bfloat16: "
           "parameters cast once, matmuls and KV cache bf16, logits and "
           "sampling fp32); MaskGIT VQGAN decode in fp32; compile excluded "
           "from images/s; random weights. " + WEIGHT_READ_NOTE)


def _rar_trainer(remat: str, batch: int, smoke: bool, devices):
  from bench import plan_memory  # pylint: disable=import-outside-toplevel
  from genvis_jax.core import sharding as shd  # pylint: disable=import-outside-toplevel
  from genvis_jax.train import trainer as trainer_lib  # pylint: disable=import-outside-toplevel
  config = load_config("configs/rar_xl.py")
  if smoke:
    _shrink(config.model, SMOKE_RAR)
    with config.unlocked():
      config.data.seq_len = config.model.seq_len
  config = plan_memory.apply_overrides(
      config, mesh={"data": 1, "fsdp": 1, "tensor": 1}, batch=batch,
      micro_batches=1, remat=remat, dtype="bfloat16")
  mesh = shd.create_mesh(config.mesh, devices)
  return config, trainer_lib.Trainer(config, mesh=mesh)


def _compile_step(config, tr):
  from bench import plan_memory  # pylint: disable=import-outside-toplevel
  from genvis_jax.core import sharding as shd  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  spec = plan_memory.batch_spec(config, tr.task, config.train.global_batch_size,
                                shd.batch_sharding(tr.mesh))
  rng = jax.ShapeDtypeStruct(tr.train_rng.shape, tr.train_rng.dtype,
                             sharding=shd.replicated(tr.mesh))
  with tr.context():
    t0 = time.perf_counter()
    lowered = tr._step.lower(  # pylint: disable=protected-access
        tr.abstract_state(), spec, rng, tr.frozen)
    compiled = lowered.compile()
  compiled.lowered_flops = cost_flops(lowered)
  return time.perf_counter() - t0, compiled, spec


def _random_batch(spec, config):
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  rs = np.random.RandomState(0)
  hi = {"label": config.model.num_classes, "tokens": config.model.codebook_size}
  return {k: jax.device_put(rs.randint(0, hi[k], s.shape).astype(s.dtype),
                            s.sharding) for k, s in spec.items()}


def _pow2_floor(x: float, cap: int) -> int:
  return max(1, min(cap, 2 ** int(math.log2(max(1.0, x)))))


def _fit_batch(capacity, b0, peak0, b1, peak1, cap) -> int:
  """Largest power-of-two batch whose compiled peak stays under 92% of the
  device memory, from two (batch, peak bytes) points (peak ~ linear in batch)."""
  slope = max(1.0, (peak1 - peak0) / (b1 - b0))
  return _pow2_floor((0.92 * capacity - (peak1 - slope * b1)) / slope, cap)


# --device_memory_gib: plan the train batch for another memory size (also how
# the probe / fit path is exercised on CPU, which reports no memory limit).
CAPACITY_OVERRIDE = None


def section_rar_train(sec: Section, dl: Deadline, sz: Sizes, smoke: bool):
  """RAR-XL train step per remat policy at the largest batch that fits.

  With a known device memory: one probe compile at a small batch plus the
  argument bytes give a first estimate; after measuring it, the two compiled
  peaks give a linear fit and a larger batch is tried when it fits. A batch
  that fails (out of memory) is halved.
  """
  import gc  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  dev = jax.devices()[0]
  peak = peak_flops(dev.device_kind)
  capacity = CAPACITY_OVERRIDE or device_memory(dev).get("bytes_limit")
  sec.note(f"device memory for the batch fit: {gib(capacity):.3g} GiB"
           if capacity else "device memory unknown: batch = the largest tried")
  sec.note(f"device bf16 peak: {peak / 1e12:.0f} TFLOP/s" if peak else
           f"no bf16 peak known for {dev.device_kind!r}: MFU omitted")
  best, last_cost = None, 0.0
  sec.note("One device, AdamW, bf16 compute with fp32 parameters and optimizer "
           "state, 256 tokens per image. mfu = the compiled step's XLA FLOPs "
           "(cost_analysis; includes remat recomputation; flops_from=lowered: the "
           "unoptimized HLO's count, used when the compiled one is under half "
           "of it) / step time / chip "
           "bf16 peak; mfu_6n uses 6 x params x tokens (model FLOPs without "
           "attention). peak_gib_compiled: memory_analysis arguments + outputs "
           "- aliases + temporaries; peak_gib_device: memory_stats "
           "peak_bytes_in_use since the start of the run.")
  try:
    for remat in sz.train_remats:
      dl.require(last_cost, f"remat={remat}")
      t_remat = time.perf_counter()
      batch, probe = sz.train_max, None
      if capacity:
        config, tr = _rar_trainer(remat, sz.train_probe, smoke, [dev])
        probe = memory_bytes(_compile_step(config, tr)[1])
        del tr
        if probe:
          # State (arguments) is fixed; count all temporaries as per-example.
          fixed = probe["argument"] + probe["generated_code"]
          per_example = max(1.0, (probe["peak"] - fixed) / sz.train_probe)
          batch = _pow2_floor((0.92 * capacity - fixed) / per_example,
                              sz.train_max)
      tried, row = set(), None
      while batch >= 1 and batch not in tried:
        tried.add(batch)
        dl.check(f"remat={remat} batch={batch}")
        t_measure = time.perf_counter()
        try:
          new = _measure_step(remat, batch, smoke, dev, dl, sz, peak, capacity)
        except SectionTimeout:
          raise
        except Exception as e:  # pylint: disable=broad-except
          sec.note(f"remat={remat} batch={batch}: {_err(e)}")
          gc.collect()
          if row:       # a larger try failed: keep the measured one
            break
          batch //= 2   # out of memory at compile or run time
          continue
        peak_b = new.pop("_peak")
        sec.add(**new)
        row = new
        if not (capacity and probe and peak_b and batch > sz.train_probe):
          break
        grown = _fit_batch(capacity, sz.train_probe, probe["peak"], batch,
                           peak_b, sz.train_max)
        if grown <= batch:
          break
        if dl.left() < time.perf_counter() - t_measure:
          sec.note(f"remat={remat}: batch {grown} would fit; no time to try")
          break
        batch = grown
      if row and (best is None or row["tokens_per_s"] > best["tokens_per_s"]):
        best = row
      gc.collect()
      # The next policy compiles as often, and its steps take no less time.
      last_cost = 0.8 * (time.perf_counter() - t_remat)
  finally:   # also when the time box ends
    if best:
      sec.note(f"best: remat={best['remat']} batch={best['batch']} "
               f"{best['tokens_per_s']:.0f} tokens/s")


def _measure_step(remat, batch, smoke, dev, dl, sz, peak, capacity):
  import jax  # pylint: disable=import-outside-toplevel
  config, tr = _rar_trainer(remat, batch, smoke, [dev])
  comp_s, compiled, spec = _compile_step(config, tr)
  mem = memory_bytes(compiled)
  if capacity and mem and mem["peak"] > capacity:
    raise MemoryError(f"compiled peak {gib(mem['peak']):.1f} GiB > "
                      f"{gib(capacity):.1f} GiB")
  # The optimized HLO's count; if the backend's cost model misses fused
  # library calls (much less than the unoptimized HLO's), use the latter.
  flops, lowered = cost_flops(compiled), getattr(compiled, "lowered_flops", None)
  flops_from = "compiled"
  if lowered and (not flops or flops < 0.5 * lowered):
    flops, flops_from = lowered, "lowered"
  data = _random_batch(spec, config)
  state = tr.init_state()
  n_params = sum(x.size for x in jax.tree_util.tree_leaves(state.params))
  state, metrics = compiled(state, data, tr.train_rng, tr.frozen)  # warm-up
  block(metrics)
  times = []
  for _ in range(sz.train_steps):
    t0 = time.perf_counter()
    state, metrics = compiled(state, data, tr.train_rng, tr.frozen)
    block(metrics)
    times.append(time.perf_counter() - t0)
    if dl.left() <= 0:
      break
  loss = float(metrics["loss"])
  step_s = statistics.median(times)
  tokens = batch * config.model.seq_len
  stats = device_memory(dev)
  del state
  return dict(
      remat=remat, batch=batch, params_m=n_params / 1e6, compile_s=comp_s,
      step_s=step_s, tokens_per_s=tokens / step_s, images_per_s=batch / step_s,
      tflops_xla=(flops / step_s / 1e12) if flops else None,
      flops_from=flops_from if flops else None,
      mfu=(flops / step_s / peak) if flops and peak else None,
      mfu_6n=(6 * n_params * tokens / step_s / peak) if peak else None,
      peak_gib_compiled=gib(mem.get("peak")), _peak=mem.get("peak"),
      peak_gib_device=gib(stats.get("peak_bytes_in_use")),
      in_use_gib_device=gib(stats.get("bytes_in_use")),
      loss=loss, steps_timed=len(times))


def section_attention_blocks(sec: Section, dl: Deadline, sz: Sizes,
                             smoke: bool):
  """Pallas tile sizes at one length (defaults are a guess until measured)."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from bench import bench_windowed_attention as bwa  # pylint: disable=import-outside-toplevel
  kernel = _kernel_impl()
  b, h, d = sz.attn_shape
  n = sz.attn_seqs[min(1, len(sz.attn_seqs) - 1)]
  keys = jax.random.split(jax.random.key(n), 4)
  inputs = [jax.random.normal(key, (b, n, h, d), jnp.bfloat16) for key in keys]
  for bq, bk in sz.attn_blocks:
    for mode in ("fwd", "fwd+bwd"):
      dl.check(f"blocks {bq}x{bk} {mode}")
      ns = argparse.Namespace(window=sz.attn_window, tokens_per_column=1,
                              block_q=bq, block_k=bk)
      try:
        ms = repeat_ms(bwa.make_fn(kernel, mode, ns), inputs, dl,
                       sz.attn_iters, f"blocks {bq}x{bk}")
        sec.add(impl=kernel, N=n, block_q=bq, block_k=bk, mode=mode, ms=ms)
      except SectionTimeout:
        raise
      except Exception as e:  # pylint: disable=broad-except
        sec.add(impl=kernel, N=n, block_q=bq, block_k=bk, mode=mode,
                note=f"failed: {_err(e)}")
  from genvis_jax.kernels.windowed_attention import DEFAULT_BLOCKS  # pylint: disable=import-outside-toplevel
  sec.note(f"{kernel} default (block_q, block_k) = {DEFAULT_BLOCKS[kernel]}; "
           f"window {sz.attn_window} tokens, bf16")


def _random_generator(spec: str, smoke_sizes: dict, smoke: bool, batch: int):
  """A paper config's generator with random weights (shrunk to
  ``smoke_sizes`` under --smoke) and ``batch`` labels cycling the classes:
  ``(config, model, params, labels)``."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from genvis_jax import models  # pylint: disable=import-outside-toplevel
  cfg = load_config(spec)
  if smoke:
    _shrink(cfg.model, smoke_sizes)
  labels = jnp.arange(batch, dtype=jnp.int32) % cfg.model.num_classes
  return cfg, models.build(cfg.model), random_params(cfg.model), labels


def section_far_sampling(sec: Section, dl: Deadline, sz: Sizes, smoke: bool):
  import jax  # pylint: disable=import-outside-toplevel
  from genvis_jax.sample import far as far_sample  # pylint: disable=import-outside-toplevel
  batch = sz.far_batch
  cfg, model, params, labels = _random_generator(
      "configs/far_b.py:dual", SMOKE_FAR, smoke, batch)
  m, s = cfg.model, cfg.sample
  model = model.clone(dtype="float32")   # the sample dtype switch sets it
  n_params = sum(x.size for x in jax.tree_util.tree_leaves(params))
  steps = m.num_codebooks * m.grid ** 2
  for dtype in SAMPLE_DTYPES:
    dl.check(f"FAR {dtype}")
    run = lambda dt=dtype: far_sample.sample(
        model, params, labels, jax.random.key(0),
        guidance_scale=s.guidance_scale, temperature=s.temperature,
        top_k=s.top_k, top_p=s.top_p, dtype=dt)
    comp_s, _ = timed(run)   # first call compiles (cached jit afterwards)
    times = []
    for _ in range(sz.iters):
      dl.check("FAR timed call")
      times.append(timed(run)[0])
    sec_s = statistics.median(times)
    position_ms = 1e3 * sec_s / m.grid ** 2
    sec.add(model="FAR-B dual", dtype=dtype, batch=batch, sub_tokens=steps,
            first_call_s=comp_s, sample_s=sec_s, position_ms=position_ms,
            weight_gb_per_s=weight_read_gbps(n_params, dtype, position_ms),
            images_per_s=batch / sec_s, sub_tokens_per_s=batch * steps / sec_s)
  sec.note(f"guidance {s.guidance_scale} (CFG doubles the batch), codes only "
           "(no FQGAN decode); first_call_s includes compilation; dtype as in "
           "rar_sampling. " + WEIGHT_READ_NOTE)


def section_eq_sampling(sec: Section, dl: Deadline, sz: Sizes, smoke: bool):
  import jax  # pylint: disable=import-outside-toplevel
  from genvis_jax.sample import eq_generator as eq_sample  # pylint: disable=import-outside-toplevel
  batch = sz.eq_batch
  cfg, model, params, labels = _random_generator(
      "configs/eq_l.py", SMOKE_EQ, smoke, batch)
  m, s = cfg.model, cfg.sample
  for cols in sz.eq_columns:
    dl.check(f"{cols} columns")
    run = lambda c=cols: eq_sample.sample(
        model, params, labels, jax.random.key(0), num_columns=c, cfg=s.cfg,
        num_steps=sz.eq_flow_steps)
    comp_s, _ = timed(run)
    times = []
    for _ in range(sz.iters):
      times.append(timed(run)[0])
      if dl.left() <= 0:
        break
    t = statistics.median(times)
    sec.add(model="Eq-L", dtype=m.dtype, batch=batch, columns=cols,
            flow_steps=sz.eq_flow_steps, first_call_s=comp_s, sample_s=t,
            columns_per_s=batch * cols / t, images_per_s=batch / t)
  sec.note(f"cfg {s.cfg} (doubled batch), Euler flow steps per column as "
           "listed; columns_per_s counts columns of all images in the batch; "
           "generator latents only (no tokenizer decode).")


def section_inception(sec: Section, dl: Deadline, sz: Sizes, smoke: bool):
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from genvis_jax.evaluate import fid as fid_lib  # pylint: disable=import-outside-toplevel
  from genvis_jax.evaluate.inception import InceptionExtractor  # pylint: disable=import-outside-toplevel
  from genvis_jax.models import inception as inc  # pylint: disable=import-outside-toplevel
  params = host_random_params(jax.eval_shape(inc.init_inception_params))
  mesh = fid_lib.data_mesh(jax.devices()[:1])
  ext = InceptionExtractor(params, batch_size=sz.incep_batch, mesh=mesh)
  rs = np.random.RandomState(0)
  images = rs.randint(0, 256, (sz.incep_batch, sz.incep_image, sz.incep_image,
                               3)).astype(np.uint8)
  comp_s, out = timed(ext, images)
  if out["pool"].shape != (sz.incep_batch, 2048) or not np.isfinite(
      out["pool"]).all():
    raise AssertionError(f"bad pool features {out['pool'].shape}")
  times = []
  for _ in range(sz.iters):
    dl.check("Inception timed call")
    times.append(timed(ext, images)[0])
  t = statistics.median(times)
  sec.add(batch=sz.incep_batch, image=sz.incep_image, first_call_s=comp_s,
          batch_s=t, images_per_s=sz.incep_batch / t)
  sec.note("uint8 host images -> device -> resize to 299 -> pool / spatial / "
           "logits back to host, fp32 at 'highest' matmul precision (as the "
           "FID evaluation runs it); random weights.")


# name, function, time box (seconds of the full run), table columns.
SECTIONS = (
    ("attention_check", section_attention_check, 15,
     ("output", "shape", "dtype", "max_abs_err", "rel_err", "ok")),
    ("attention", section_attention, 85,
     ("N", "W", "mode", "impl", "ms", "tflops", "vs_dense", "vs_banded",
      "note")),
    ("rar_sampling", section_rar_sampling, 130,
     ("model", "dtype", "batch", "compile_s", "sample_s", "step_ms",
      "weight_gb_per_s", "images_per_s", "decode_s", "images_per_s_decoded")),
    ("rar_train", section_rar_train, 125,
     ("remat", "batch", "step_s", "tokens_per_s", "mfu", "mfu_6n",
      "peak_gib_compiled", "peak_gib_device")),
    ("far_sampling", section_far_sampling, 50,
     ("model", "dtype", "batch", "sample_s", "position_ms", "weight_gb_per_s",
      "images_per_s")),
    ("eq_sampling", section_eq_sampling, 45,
     ("model", "batch", "columns", "sample_s", "columns_per_s")),
    ("inception", section_inception, 30,
     ("batch", "batch_s", "images_per_s")),
    ("attention_blocks", section_attention_blocks, 25,
     ("impl", "N", "block_q", "block_k", "mode", "ms", "note")),
)


def parse_args(argv=None):
  p = argparse.ArgumentParser(
      description=__doc__.split("\n\n")[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", required=True, help="directory for results.json/.md")
  p.add_argument("--smoke", action="store_true",
                 help="tiny shapes (CPU CI check of every section)")
  p.add_argument("--sections", default="",
                 help="comma-separated subset, default all: "
                      + ",".join(s[0] for s in SECTIONS))
  p.add_argument("--budget_s", type=float, default=480.0,
                 help="whole-run budget; section boxes are scaled to it")
  p.add_argument("--device_memory_gib", type=float, default=None,
                 help="memory the train batch is fitted to (default: the "
                      "device's bytes_limit)")
  p.add_argument("--wheels", default=os.path.join(ROOT, "wheels"),
                 help="where to find a carried ml_collections wheel")
  args = p.parse_args(argv)
  names = [s[0] for s in SECTIONS]
  chosen = [s for s in args.sections.split(",") if s]
  unknown = sorted(set(chosen) - set(names))
  if unknown:
    p.error(f"unknown sections {unknown}; choose from {names}")
  args.sections = chosen or names
  return args


def _version(dist: str) -> str:
  from importlib import metadata  # pylint: disable=import-outside-toplevel
  try:
    return metadata.version(dist)
  except metadata.PackageNotFoundError:
    return "not installed"


def _plugins() -> list:
  """Installed jax PJRT plugins (e.g. the CUDA one) with their versions."""
  from importlib import metadata  # pylint: disable=import-outside-toplevel
  names = {d.metadata["Name"] for d in metadata.distributions()
           if (d.metadata["Name"] or "").lower().startswith(("jax-cuda",
                                                             "jax_cuda",
                                                             "libtpu"))}
  return sorted(f"{n} {metadata.version(n)}" for n in names)


def header(smoke: bool) -> dict:
  import jax  # pylint: disable=import-outside-toplevel
  dev = jax.devices()[0]
  mem = device_memory(dev).get("bytes_limit")
  return {
      "mode": "smoke (tiny shapes)" if smoke else "full",
      "device": f"{dev.platform}:{dev.device_kind} x{jax.device_count()}",
      "device_memory_gib": round(gib(mem), 1) if mem else None,
      "bf16_peak_tflops": (peak_flops(dev.device_kind) or 0) / 1e12 or None,
      **{name: _version(name) for name in
         ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint")},
      "jax_plugins": ", ".join(_plugins()) or None,
      "python": platform.python_version(),
      "commit": commit_id(),
      "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
  }


def main(argv=None) -> int:
  args = parse_args(argv)
  global CAPACITY_OVERRIDE
  if args.device_memory_gib:
    CAPACITY_OVERRIDE = int(args.device_memory_gib * 2**30)
  # GPU: let the allocator take 92% of the memory (jax's default is 75%) so
  # the train step's batch can grow; set before jax initialises the backend.
  os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")
  src = ensure_ml_collections(
      [args.wheels, os.environ.get("GENVIS_WHEELS", "")])
  # A hung compile still leaves a stack trace (and the JSON written so far).
  faulthandler.dump_traceback_later(args.budget_s + 90, exit=True)
  t_start = time.perf_counter()
  hdr = header(args.smoke)
  hdr["ml_collections"] = src
  print("# Accelerator suite\n" + "\n".join(f"- {k}: {v}" for k, v in hdr.items()),
        flush=True)
  sizes = SMOKE if args.smoke else REAL
  plan = [s for s in SECTIONS if s[0] in args.sections]
  scale = args.budget_s / sum(s[2] for s in plan)
  sections = [Section(name, cols) for name, _, _, cols in plan]
  write_results(args.out, hdr, sections)
  schedule = 0.0
  for sec, (name, fn, box, _) in zip(sections, plan):
    # Cumulative schedule: time a section leaves unused goes to later ones.
    schedule += box * scale
    end = t_start + schedule
    print(f"\n## {name} (until +{schedule:.0f} s)", flush=True)
    t0 = time.perf_counter()
    try:
      if end - t0 <= 0:
        raise SectionTimeout("no time left in the budget")
      fn(sec, Deadline(end), sizes, args.smoke)
      sec.status = "ok"
    except SectionTimeout as e:
      sec.status = "timeout"
      sec.note(f"{e} (rows above were measured)")
    except Exception as e:  # pylint: disable=broad-except
      sec.status = "failed"
      sec.note(f"failed: {_err(e)}")
      traceback.print_exc()
    sec.seconds = time.perf_counter() - t0
    print(f"{name}: {sec.status} ({sec.seconds:.0f} s)", flush=True)
    write_results(args.out, hdr, sections)
  faulthandler.cancel_dump_traceback_later()
  total = time.perf_counter() - t_start
  # All tables once more at the end: what a log tail shows.
  print("\n" + "\n".join(s.markdown() for s in sections), flush=True)
  print(f"total {total:.0f} s; results in {args.out}/results.json and "
        "results.md", flush=True)
  print("STATUS " + " ".join(f"{s.name}={s.status}" for s in sections))
  return 0 if all(s.status == "ok" for s in sections) else 1


if __name__ == "__main__":
  try:
    sys.exit(main())
  except UserError as e:   # one message, no traceback
    sys.exit(f"accelerator.py: {e}")
