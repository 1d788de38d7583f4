"""Accelerator-suite sections of the Pallas windowed causal attention kernel:
correctness against the XLA reference, timing against dense and banded XLA
attention, and the kernel's tile sizes (see ``bench/accelerator.py``)."""

from __future__ import annotations

import argparse

from bench.accel_harness import (Deadline, Section, SectionTimeout, Sizes,
                                 error_line, repeat_ms)


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
          sec.add(N=n, W=w, mode=mode, impl=impl, note=f"failed: {error_line(e)}")
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
                note=f"failed: {error_line(e)}")
  from genvis_jax.kernels.windowed_attention import DEFAULT_BLOCKS  # pylint: disable=import-outside-toplevel
  sec.note(f"{kernel} default (block_q, block_k) = {DEFAULT_BLOCKS[kernel]}; "
           f"window {sz.attn_window} tokens, bf16")

