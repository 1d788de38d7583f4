"""Accelerator suite: what a short GPU/TPU window can tell us, section by section.

  python bench/accelerator.py --out=$OUT            # on the accelerator
  python bench/accelerator.py --out=$OUT --sections=far_sampling \
      --size "far_batch=16"                         # a part, resized
  python bench/accelerator.py --smoke --out=/tmp/a  # CPU, tiny shapes (CI)

Compiling dominates on a GPU (one H200: the RAR-B sampler 110 s, FAR-B ~80 s,
Equivariant-L ~25 s per width, a jitted RAR-XL train step over 100 s), so the
whole default set needs about 35 minutes. Each section's time box is that
estimate, in seconds; ``--budget_s`` caps the run (a budget above the boxes'
sum stretches them), so with the default 8 minutes the sections after RAR
sampling find no time left, in order of value.

Sections run in order of value, each in its own time box (a deadline checked
between measured iterations; a compile cannot be interrupted). A section that
fails or runs out of time records why and the next one runs. Results go to
stdout as markdown tables and, as each row is measured, to ``OUT/results.json``
and ``OUT/results.md`` (so a run killed at the command limit keeps what it
measured; SIGTERM marks the running section "killed").

  attention_check  Pallas windowed causal attention (the backend's kernel; on
                CPU the GPU kernel in interpret mode): forward / backward error
                vs the XLA reference, fp32.
  attention     The kernel's ms, TFLOP/s and speed-up vs dense masked and banded
                XLA attention at N = 4k, 16k, 64k, W = 512 tokens, bf16.
  rar_sampling  RAR-B / RAR-XL KV-cache sampling, CFG, 256 tokens, batch
                64 / 256, sample dtype bf16 then fp32, per KV-chunk size:
                images/s beside the matmul floor, then with the MaskGIT VQGAN
                decode (fp32), compile seconds apart.
  rar_train     RAR-XL train step (bf16 compute, fp32 master weights, AdamW),
                one device, largest batch that fits per remat policy: step time,
                tokens/s, MFU, peak memory.
  far_sampling  FAR-B (dual) KV-cache sampling images/s (codes, CFG 2.0), bf16
                then fp32, beside the matmul floor.
  eq_sampling   Equivariant-L column sampler (CFG, 100 flow steps): columns/s
                at 16 and 128 columns.
  inception     FID Inception extractor images/s at batch 500 (256 px uint8).
  attention_blocks  Pallas tile sizes (block_q x block_k) at N = 16k: ms.

All weights are random: these are speed and memory numbers, not quality ones.
This file is the entry point (flags, the section table, the schedule); the
harness (time boxes, result files, timing helpers, sizes) is
``bench/accel_harness.py`` and the sections are ``bench/accel_attention.py``
(the Pallas kernel), ``bench/accel_models.py`` (the generators' samplers, the
Inception extractor) and ``bench/accel_train.py`` (the train step).

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
import os
import platform
import signal
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:   # run from a copy of the repository, not installed
  sys.path.insert(0, ROOT)

# pylint: disable=wrong-import-position
# noqa: E402 below: these need ROOT on sys.path; none imports jax at import time.
from bench import accel_train  # noqa: E402
from bench.accel_attention import (section_attention,  # noqa: E402
                                   section_attention_blocks,
                                   section_attention_check)
from bench.accel_harness import (SMOKE, REAL, Deadline, Section,  # noqa: E402
                                 SectionTimeout, commit_id, device_memory,
                                 ensure_ml_collections, error_line, gib,
                                 peak_flops, write_results)
from bench.accel_models import (section_eq_sampling,  # noqa: E402
                                section_far_sampling, section_inception,
                                section_rar_sampling)
from bench.accel_train import section_rar_train  # noqa: E402
from genvis_jax.errors import UserError  # noqa: E402  (no dependencies)

# name, function, time box (seconds the default sizes take on one H200, from
# the compiles measured there: attention 67 s, the RAR-B sampler 110 s per
# case, FAR-B ~80 s per dtype, Equivariant-L ~25 s per width; the train step's
# and Inception's are estimates), table columns.
SECTIONS = (
    ("attention_check", section_attention_check, 15,
     ("output", "shape", "dtype", "max_abs_err", "rel_err", "ok")),
    ("attention", section_attention, 85,
     ("N", "W", "mode", "impl", "ms", "tflops", "vs_dense", "vs_banded",
      "note")),
    ("rar_sampling", section_rar_sampling, 1000,
     ("model", "dtype", "batch", "bucket", "compile_s", "sample_s", "step_ms",
      "weight_gb_per_s", "x_floor", "bytes_ratio", "images_per_s", "decode_s",
      "images_per_s_decoded")),
    ("rar_train", section_rar_train, 600,
     ("remat", "batch", "step_s", "tokens_per_s", "mfu", "mfu_6n",
      "peak_gib_compiled", "peak_gib_device")),
    ("far_sampling", section_far_sampling, 220,
     ("model", "dtype", "batch", "sample_s", "position_ms", "weight_gb_per_s",
      "x_floor", "bytes_ratio", "images_per_s")),
    ("eq_sampling", section_eq_sampling, 90,
     ("model", "batch", "columns", "sample_s", "columns_per_s")),
    ("inception", section_inception, 60,
     ("batch", "batch_s", "images_per_s")),
    ("attention_blocks", section_attention_blocks, 40,
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
                 help="whole-run cap in seconds; a budget above the section "
                      "boxes' sum stretches them")
  p.add_argument("--device_memory_gib", type=float, default=None,
                 help="memory the train batch is fitted to (default: the "
                      "device's bytes_limit)")
  p.add_argument("--size", action="append", default=[], metavar="FIELD=VALUE",
                 help="override one of the run's sizes (a Python literal), "
                      "e.g. --size rar_sizes=\"('b',)\" --size iters=2; "
                      "repeatable; fields: bench/accel_harness.py's Sizes")
  p.add_argument("--wheels", default=os.path.join(ROOT, "wheels"),
                 help="where to find a carried ml_collections wheel")
  p.add_argument("--force", action="store_true",
                 help="replace the results.json / results.md already in --out")
  p.add_argument("--allow_cpu", action="store_true",
                 help="run the full sizes on a CPU backend (minutes per "
                      "section, numbers of no use; --smoke is the CPU check)")
  args = p.parse_args(argv)
  if not args.budget_s > 0:
    p.error(f"--budget_s={args.budget_s:g}: give the run's seconds (> 0)")
  if not args.force and os.path.exists(os.path.join(args.out, "results.json")):
    p.error(f"{args.out}/results.json holds an earlier run's rows: choose "
            "another --out, or pass --force to replace them")
  names = [s[0] for s in SECTIONS]
  chosen = [s for s in args.sections.split(",") if s]
  unknown = sorted(set(chosen) - set(names))
  if unknown:
    p.error(f"unknown sections {unknown}; choose from {names}")
  args.sections = chosen or names
  try:
    args.size = dict(_size_override(kv) for kv in args.size)
  except ValueError as e:
    p.error(str(e))
  return args


def _size_override(text: str):
  """'field=literal' -> (field, value): a value of the field's type (a
  non-empty tuple, a bool, an int >= 1); ValueError naming the problem."""
  import ast  # pylint: disable=import-outside-toplevel
  fields = [f.name for f in dataclasses.fields(REAL)]
  key, sep, value = text.partition("=")
  if not sep or key not in fields:
    raise ValueError(f"--size {text!r}: expected FIELD=VALUE with FIELD one "
                     f"of {fields}")
  example = 'rar_sizes="(\'b\',)"'
  try:
    parsed = ast.literal_eval(value)
  except (ValueError, SyntaxError) as e:
    raise ValueError(f"--size {text!r}: {value!r} is not a Python literal "
                     f"(strings need Python quotes, e.g. {example})") from e
  want = type(getattr(REAL, key))
  if type(parsed) is not want:   # bool is not taken for int, nor 64 for (64,)
    kind = {int: "an int", bool: "True or False", tuple: "a tuple"}[want]
    raise ValueError(f"--size {text!r}: {key} takes {kind}, e.g. "
                     f"{key}={getattr(REAL, key)!r}")
  if parsed == () or want is int and parsed < 1:
    raise ValueError(f"--size {text!r}: {key} must be "
                     + ("non-empty" if want is tuple else "at least 1"))
  return key, parsed


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
  if args.device_memory_gib:
    accel_train.CAPACITY_OVERRIDE = int(args.device_memory_gib * 2**30)
  # GPU: let the allocator take the share the train step's batch is fitted
  # to (jax's default is 75%); set before jax initialises the backend.
  os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION",
                        str(accel_train.MEMORY_FRACTION))
  import jax  # pylint: disable=import-outside-toplevel
  if jax.default_backend() == "cpu" and not (args.smoke or args.allow_cpu):
    raise UserError(
        "the backend is CPU: the full sizes (paper-size models) would take "
        "minutes per section and measure nothing of use. Run on a GPU / TPU, "
        "or pass --smoke (tiny shapes: checks every section) or --allow_cpu.")
  src = ensure_ml_collections(
      [args.wheels, os.environ.get("GENVIS_WHEELS", "")])
  # A hung compile still leaves a stack trace (and the JSON written so far).
  faulthandler.dump_traceback_later(args.budget_s + 90, exit=True)
  t_start = time.perf_counter()
  hdr = header(args.smoke)
  hdr["ml_collections"] = src
  sizes = dataclasses.replace(SMOKE if args.smoke else REAL, **args.size)
  if args.size:
    hdr["sizes_overridden"] = args.size
  print("# Accelerator suite\n" + "\n".join(f"- {k}: {v}" for k, v in hdr.items()),
        flush=True)
  plan = [s for s in SECTIONS if s[0] in args.sections]
  # Boxes are seconds; a larger budget stretches them, a smaller one leaves
  # the last sections without time (the most valuable run first).
  scale = max(1.0, args.budget_s / sum(s[2] for s in plan))
  sections = [Section(name, cols) for name, _, _, cols in plan]
  save = lambda: write_results(args.out, hdr, sections)
  for sec in sections:
    sec.save = save

  def killed(signum, _):
    # The command limit's SIGTERM: the running section's rows are on file;
    # say it was stopped, not still running.
    for sec in sections:
      if sec.status == "running":
        sec.status = f"killed ({signal.Signals(signum).name})"
    save()
    # Not sys.exit: the interpreter's shutdown under XLA's running threads
    # crashed (a segfault, exit 139) after the rows were on file.
    sys.stdout.flush()
    os._exit(128 + signum)  # pylint: disable=protected-access

  before = signal.signal(signal.SIGTERM, killed)
  save()
  schedule = 0.0
  try:
    for sec, (name, fn, box, _) in zip(sections, plan):
      # Cumulative schedule: time a section leaves unused goes to later ones.
      schedule = min(schedule + box * scale, args.budget_s)
      end = t_start + schedule
      print(f"\n## {name} (until +{schedule:.0f} s)", flush=True)
      t0 = time.perf_counter()
      sec.status = "running"   # what the files say if the run dies here
      try:
        if end - t0 <= 0:
          raise SectionTimeout("no time left in the budget")
        fn(sec, Deadline(end), sizes, args.smoke)
        sec.status = "ok"
      except SectionTimeout as e:
        sec.status = "timeout"
        sec.note(f"{e} (rows above were measured)" if sec.rows else str(e))
      except Exception as e:  # pylint: disable=broad-except
        sec.status = "failed"
        sec.note(f"failed: {error_line(e)}")
        traceback.print_exc()
      sec.seconds = time.perf_counter() - t0
      print(f"{name}: {sec.status} ({sec.seconds:.0f} s)", flush=True)
      save()
  finally:
    signal.signal(signal.SIGTERM, before)
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
