"""glibc malloc settings for XLA:CPU runs (the demo, tests, CPU evaluation).

XLA:CPU allocates the temporary buffer of every execution (524 MB for one step
of the demo RAR) with ``malloc`` from its pool threads. glibc serves requests
over 64 MB from a non-main arena with a fresh ``mmap`` and returns them with
``munmap``, so every step page-faults its whole working set again: 137k page
faults and 0.23 s of kernel time per demo RAR step (``strace`` shows one
``mmap`` of the temp size per step). One arena, no ``mmap`` and a high trim
threshold keep that memory in the heap and reuse it: the demo's RAR step goes
from 0.46 s to 0.38-0.40 s and its tokenizer step from 0.43 s to 0.38 s on a
2-core machine. Trimming is off altogether (threshold -1), not merely high: a
RAR-B train step's temporaries (6.7 GB at batch 4) exceed any int threshold,
and with the largest one (2 GB) the step still faulted 1.65M pages (5 s of
kernel time in a 9 s step); with trimming off it faults none and takes 5.9 s.

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
  # -1: never return the heap's top to the OS (man mallopt); any finite int
  # threshold is below the temporaries of a paper-size train step.
  return bool(ok and mallopt(_M_TRIM_THRESHOLD, -1))
