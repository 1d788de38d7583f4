"""glibc malloc settings for XLA:CPU runs (the demo, tests, CPU evaluation).

XLA:CPU allocates the temporary buffer of every execution (524 MB for one step
of the demo RAR) with ``malloc`` from its pool threads. glibc serves requests
over 64 MB from a non-main arena with a fresh ``mmap`` and returns them with
``munmap``, so every step page-faults its whole working set again: 137k page
faults and 0.23 s of kernel time per demo RAR step (``strace`` shows one
``mmap`` of the temp size per step). One arena, no ``mmap`` and a high trim
threshold keep that memory in the heap and reuse it: the demo's RAR step goes
from 0.46 s to 0.38-0.40 s and its tokenizer step from 0.43 s to 0.38 s on a
2-core machine.

The trim threshold is the largest int mallopt takes (2 GB), not -1 (never
trim): temporaries above it (6.7 GB in a RAR-B train step at batch 4) are
still handed back and faulted in again each step (1.65M faults, 5 s of kernel
time in a 9 s step), but a never-trimmed single-arena heap fragments when one
process alternates several such executables: a profile of four RAR-B step
variants (``bench/profile_rar_train.py``) grew past 24 GB and was killed with
either threshold, where glibc's defaults fit. So this tuning suits the
small-model CPU runs it was made for (demo, tests, evaluation), not
paper-size CPU training.
``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` (set before Python starts) cuts
those faults 500-fold with the default trimming: batch 4 in 6.4 s instead of 9.0 s.

Must run before any thread allocates (arenas are per thread), so ``main`` calls
it first. Accelerator hosts are left alone: their big buffers live on the
device and a single arena would serialise the input pipeline's threads.
Opt out with ``GENVIS_CPU_MALLOC=0``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import pkgutil
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8

# Installed packages with these prefixes mean JAX will pick an accelerator.
_ACCELERATOR_PREFIXES = ("libtpu", "jax_cuda", "jax_rocm")


def cpu_only() -> bool:
  """True when JAX will run on the CPU (no accelerator plugin, or forced)."""
  platforms = os.environ.get("JAX_PLATFORMS", "").strip().lower()
  if platforms:
    return platforms == "cpu"
  return not any(m.name.startswith(_ACCELERATOR_PREFIXES)
                 for m in pkgutil.iter_modules())


def tune(force: bool = False) -> bool:
  """Applies the settings on glibc + CPU-only; returns whether it did."""
  if os.environ.get("GENVIS_CPU_MALLOC", "1") == "0":
    return False
  if not sys.platform.startswith("linux") or not (force or cpu_only()):
    return False
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    mallopt = libc.mallopt
  except (OSError, AttributeError):   # musl or another libc: nothing to tune
    return False
  ok = mallopt(_M_ARENA_MAX, 1) and mallopt(_M_MMAP_MAX, 0)
  return bool(ok and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
