"""Harness of the accelerator suite (``bench/accelerator.py``): time boxes,
result tables and files, timing and compile statistics, random parameters,
the run sizes, and the bootstrap that finds ``ml_collections`` on a machine
where nothing can be installed.

Imported as ``bench.accel_harness``, so the repository root is on
``sys.path``; jax is imported lazily (the bootstrap runs first).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Callable

from genvis_jax.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

def peak_flops(device_kind: str) -> float | None:
  """Dense bf16 FLOP/s of ``device_kind`` (``genvis_jax.core.flops``'s
  table, which the training log's utilization reads too) or None (MFU is
  then omitted)."""
  from genvis_jax.core import flops  # pylint: disable=import-outside-toplevel
  peak = flops.peak_tflops(device_kind)
  return None if peak is None else peak * 1e12


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
  """One section's results; rows are appended as they are measured, and
  ``save`` (the run's result files, set by ``accelerator.main``) is called
  on every change: a run killed inside a section keeps its rows."""
  name: str
  columns: tuple
  rows: list = dataclasses.field(default_factory=list)
  notes: list = dataclasses.field(default_factory=list)
  status: str = "pending"
  seconds: float = 0.0
  save: Callable[[], None] = dataclasses.field(default=lambda: None,
                                               repr=False, compare=False)

  def add(self, **row):
    self.rows.append(row)
    self.show(row)

  def keep(self, row: dict) -> dict:
    """Keeps ``row`` (saved now) that later columns complete; ``show`` it
    when done. Returns ``row``."""
    self.rows.append(row)
    self.save()
    return row

  def show(self, row: dict):
    """Prints ``row`` (one of ``rows``) and saves the results."""
    print("  " + " | ".join(f"{k}={_fmt(v)}" for k, v in row.items()),
          flush=True)
    self.save()

  def log(self, text: str):
    """A progress line (not kept): where a section's time goes, so a run cut
    short by its time box still says what ran and for how long."""
    print(f"  .. {text}", flush=True)

  def note(self, text: str):
    self.notes.append(text)
    print(f"  note: {text}", flush=True)
    self.save()

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


def error_line(e: BaseException) -> str:
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


def timed_runs(fn, args, deadline: Deadline, iters: int) -> list:
  """``(seconds, result)`` of up to ``iters`` blocking calls: at least one
  (its compile is paid by now), then none once the deadline passes."""
  runs = []
  for _ in range(iters):
    runs.append(timed(fn, *args))
    if deadline.left() <= 0:
      break
  return runs


def repeat_ms(fn, args, deadline: Deadline, iters: int, what: str):
  """Median ms of ``timed_runs`` after one warm-up (the compile when not
  AOT). Raises SectionTimeout, before the warm-up, if the deadline has
  passed."""
  deadline.check(what)
  block(fn(*args))
  return statistics.median(t for t, _ in timed_runs(fn, args, deadline,
                                                    iters)) * 1e3


def aot(fn, *args):
  """(compile seconds, compiled) of a jitted fn for these arguments."""
  t0 = time.perf_counter()
  compiled = fn.lower(*args).compile()
  return time.perf_counter() - t0, compiled


def cost_flops(compiled) -> float | None:
  """FLOPs XLA counts for one call of a compiled (or lowered) function
  (``genvis_jax.core.flops.xla_flops``)."""
  from genvis_jax.core import flops  # pylint: disable=import-outside-toplevel
  return flops.xla_flops(compiled)


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
  """Random parameters for a model config, made on the host and put on the
  device: ``jax.eval_shape`` of the init (traced, not compiled) filled by
  ``host_random_params``. A jitted init compiled for 50-80 s per paper-size
  generator on an H200 (XLA:GPU), most of a section's time box."""
  import jax  # pylint: disable=import-outside-toplevel
  from genvis_jax import models  # pylint: disable=import-outside-toplevel
  abstract = jax.eval_shape(lambda k: models.init_params(cfg, k),
                            jax.random.key(seed))
  return jax.device_put(host_random_params(abstract, seed))


def host_random_params(abstract, seed=0):
  """Random numpy parameters for an abstract tree: kernels N(0, 1 / fan_in),
  1-D ``scale`` / ``var`` ones, other 1-D zeros. The normals are one pool of
  2^22 draws tiled over every kernel from its start, so kernels of one shape
  are equal (every block of a model alike): speed numbers need no independent
  weights, and drawing them all costs ~1.3 s per 100M parameters on a small
  host, this ~0.3 s. Compiling the Inception init costs ~45 s of XLA:CPU
  time."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  pool = np.random.default_rng(seed).standard_normal(1 << 22, dtype=np.float32)

  def leaf(path, a):
    name = str(getattr(path[-1], "key", path[-1]))
    if a.ndim <= 1:
      fill = np.ones if name in ("scale", "var") else np.zeros
      return fill(a.shape, a.dtype)
    fan_in = int(np.prod(a.shape[:-1]))
    w = np.resize(pool, a.shape) * np.float32(1 / np.sqrt(fan_in))
    return w.astype(a.dtype)
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
  rar_decode: bool       # also time the MaskGIT VQGAN decode of the codes
  rar_buckets: tuple     # the cached decoder's KV chunks (None: its default)
  sample_dtypes: tuple   # RAR / FAR sampler dtypes: the accelerator's (bf16)
                         # first, the one to have if the time runs out
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
    rar_sizes=("b", "xl"), rar_batches=(64, 256), rar_decode=True,
    rar_buckets=(None,), sample_dtypes=("bfloat16", "float32"),
    train_probe=32, train_max=1024, train_remats=("none", "dots", "full"),
    train_steps=5, far_batch=64, eq_batch=64, eq_columns=(16, 128),
    eq_flow_steps=100, incep_batch=500, incep_image=256, iters=3)

SMOKE = Sizes(
    attn_check=(1, 64, 2, 16, 16), attn_seqs=(64, 128), attn_shape=(1, 2, 16),
    attn_window=16, attn_iters=2, dense_max_n=64, attn_blocks=((16, 32),),
    rar_sizes=("b",), rar_batches=(2,), rar_decode=True, rar_buckets=(None, 0),
    sample_dtypes=("bfloat16", "float32"), train_probe=2, train_max=8,
    train_remats=("full",), train_steps=2, far_batch=2, eq_batch=2,
    eq_columns=(2, 4), eq_flow_steps=2, incep_batch=2, incep_image=32, iters=1)

# Tiny models for --smoke: the paper configs with their sizes overridden, so
# the same builders, samplers and train step run.
SMOKE_RAR = dict(depth=2, hidden_size=32, num_heads=2, mlp_dim=64,
                 codebook_size=256, seq_len=64, max_pos=128, num_timesteps=80)
SMOKE_FAR = dict(n_layer=2, n_head_layer=1, dim=32, n_head=2, codebook_size=64,
                 grid=4, multiple_of=16)
SMOKE_EQ = dict(depth=2, hidden_size=32, num_heads=2, head_width=32,
                head_depth=1, token_dim=8, num_cond_tokens=2)



def shrink(model_cfg, overrides):
  with model_cfg.unlocked():
    model_cfg.update(overrides)
  return model_cfg

